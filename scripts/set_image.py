"""Pin the predictor image of every deployable to one tag and digest (the promote step).

    uv run python scripts/set_image.py ghcr.io/acme/fraud-predictor 3f9c2e1 \
        --digest sha256:4b1f...
    uv run python scripts/set_image.py --check    # exit 1 until every deployable is pinned

Rewrites the `images:` entry named `fraud-predictor` in each deployable's
kustomization.yaml (what `kustomize edit set image` does) and nothing else, so the
commit that Argo CD syncs is a small change per deployable. With a digest, kustomize
renders `name:tag@digest`: the tag for people, the digest for the kubelet, so the pods run
exactly the image that was smoke-tested even if the tag is pushed again.

The repository ships the placeholder REGISTRY/fraud-predictor:SET-ME, which no kubelet can
pull; `--check` names each deployable still holding it, or holding an image without a
digest, before anything is applied.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOYABLES = ("manifests/overlays/knative", "manifests/overlays/standard", "manifests/fallback")
IMAGE_ENTRY = re.compile(
    r"  - name: fraud-predictor\n    newName: \S+\n    newTag: \S+\n(    digest: \S+\n)?"
)
PLACEHOLDER_NAME = "REGISTRY/fraud-predictor"
PLACEHOLDER_TAG = "SET-ME"
ENTRY_FIELD = re.compile(r"^    (newName|newTag|digest): (\S+)$", re.M)
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def set_image(kustomization: Path, name: str, tag: str, digest: str | None = None) -> bool:
    """True if the file changed."""
    text = kustomization.read_text()
    entry = f"  - name: fraud-predictor\n    newName: {name}\n    newTag: {tag}\n"
    if digest:
        entry += f"    digest: {digest}\n"
    updated, count = IMAGE_ENTRY.subn(lambda _: entry, text)
    if count != 1:
        raise SystemExit(f"error: {kustomization} has no single fraud-predictor images entry")
    kustomization.write_text(updated)
    return updated != text


def image_problem(kustomization: Path) -> str | None:
    """Why this deployable's image cannot be applied as it is, or None."""
    match = IMAGE_ENTRY.search(kustomization.read_text())
    if match is None:
        return "has no single fraud-predictor images entry"
    fields = dict(ENTRY_FIELD.findall(match.group(0)))
    reference = f"{fields['newName']}:{fields['newTag']}"
    if fields["newName"] == PLACEHOLDER_NAME or fields["newTag"] == PLACEHOLDER_TAG:
        return f"image is the placeholder {reference}"
    if "digest" not in fields:
        return f"image {reference} has no digest"
    return None


def check(root: Path) -> int:
    """0 if every deployable pins a real image by digest; else 1, one line per deployable."""
    problems = 0
    for deployable in DEPLOYABLES:
        problem = image_problem(root / deployable / "kustomization.yaml")
        if problem:
            problems += 1
            print(
                f"error: {deployable}: {problem}; run scripts/set_image.py <repository> <tag>"
                " --digest sha256:<digest of the pushed image>",
                file=sys.stderr,
            )
    if not problems:
        print(f"every deployable pins its image by digest ({len(DEPLOYABLES)} checked)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "name", nargs="?", help="image repository, e.g. ghcr.io/acme/fraud-predictor"
    )
    parser.add_argument("tag", nargs="?", help="immutable tag, e.g. the commit SHA")
    parser.add_argument("--digest", help="the pushed image's digest, sha256:<64 hex>")
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 if a deployable still has the placeholder or no digest",
    )
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    if args.check:
        if args.name or args.tag or args.digest:
            parser.error("--check takes no image")
        return check(args.root)
    if not (args.name and args.tag):
        parser.error("the image repository and tag are required (or --check)")
    if not TAG.match(args.tag) or args.tag == "latest":
        print(f"error: {args.tag!r} is not a pinned image tag", file=sys.stderr)
        return 2
    if args.digest is not None and not DIGEST.match(args.digest):
        print(f"error: {args.digest!r} is not a sha256 image digest", file=sys.stderr)
        return 2
    reference = f"{args.name.lower()}:{args.tag}" + (f"@{args.digest}" if args.digest else "")
    for deployable in DEPLOYABLES:
        path = args.root / deployable / "kustomization.yaml"
        changed = set_image(path, args.name.lower(), args.tag, args.digest)
        print(f"{deployable}: {reference}{'' if changed else ' (unchanged)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
