"""The README and the manual: the manual builds strictly (every page in the nav, every link
and anchor resolving), the README stays a short guide whose links resolve inside the
repository, and `.ci/run` runs the README's test commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs dependency group)")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        capture_output=True, text=True, timeout=120, cwd=config.parent,
    )  # fmt: skip


def test_the_manual_builds_strictly(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "shadow-and-drift" / "index.html").exists()


def test_the_strict_build_catches_a_broken_anchor_and_a_page_left_out(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    api = copy / "docs" / "api.md"
    api.write_text(api.read_text() + "\nSee [nowhere](operations.md#no-such-heading).\n")
    broken = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert broken.returncode != 0 and "no-such-heading" in broken.stdout + broken.stderr
    api.write_text((ROOT / "docs" / "api.md").read_text())
    (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    left_out = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert left_out.returncode != 0 and "orphan.md" in left_out.stdout + left_out.stderr


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"`([^`]*)`", r"\1", heading), "-")


def anchors(markdown: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", markdown.read_text()))}


def broken_links(text: str, where: Path) -> list[str]:
    """Relative links of `text` (the file `where`) that leave the repository, name no
    file, or name an anchor the target Markdown file does not have."""
    problems = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (where.parent / path).resolve() if path else where
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.is_file():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor}")
    return problems


def test_every_relative_link_of_the_readme_resolves_to_a_file_of_the_repository():
    text = README.read_text()
    assert len(LINK.findall(text)) > 10, "the README links into the manual"
    assert broken_links(text, README) == []


def test_link_check_catches_a_missing_file_a_missing_anchor_and_a_path_outside():
    planted = (
        "[a](docs/missing.md) [b](docs/api.md#no-such-heading) [c](../shared/x.md) "
        "[d](docs/api.md#transaction-schema) [e](https://example.com/x) [f](.env.example)\n"
    )
    assert broken_links(planted, README) == [
        "docs/missing.md: no such file",
        "docs/api.md#no-such-heading: no heading #no-such-heading",
        "../shared/x.md: outside the repository",
    ]


def test_the_readme_is_a_short_guide_that_stays_in_the_repository():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    assert "../" not in text, "the README names a path beside the repository"
    for page in (ROOT / "docs").glob("*.md"):
        assert "../shared" not in page.read_text(), page.name


def readme_block_after(heading: str) -> list[str]:
    """The commands of the first fenced block under `heading`, comments stripped."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1]
    block = section.split("```", 2)[1].split("\n", 1)[1]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_quickstart_serves_and_tests_and_ci_runs_the_readme_test_commands():
    quickstart = readme_block_after("Quickstart")
    assert quickstart == ["uv run python -m predictor", "uv run pytest"]
    tests = readme_block_after("Tests")
    assert tests[0] == "uv run pytest"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if re.match(r"^\s*(uv run pytest|bash scripts/)", line)]
    assert commands == tests


def test_the_readme_layout_names_every_module_and_script():
    layout = README.read_text().split("\n## Layout\n", 1)[1].split("```", 2)[1]
    files = [*(ROOT / "predictor").glob("*.py"), *(ROOT / "predictor" / "training").glob("*.py")]
    files += [path for path in (ROOT / "scripts").iterdir() if path.is_file()]
    missing = [
        str(path.relative_to(ROOT))
        for path in files
        if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}\b", layout)
    ]
    assert missing == [], f"add them to the README's Layout: {missing}"
