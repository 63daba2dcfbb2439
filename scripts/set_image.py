"""Pin the predictor image of every deployable to one tag (the GitOps promote step).

    uv run python scripts/set_image.py ghcr.io/acme/fraud-predictor 3f9c2e1

Rewrites the `images:` entry named `fraud-predictor` in each deployable's
kustomization.yaml (what `kustomize edit set image` does) and nothing else, so the
commit that Argo CD syncs is a one-line change per deployable.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOYABLES = ("manifests/overlays/knative", "manifests/overlays/standard", "manifests/fallback")
IMAGE_ENTRY = re.compile(
    r"(  - name: fraud-predictor\n    newName: )(?P<name>\S+)(\n    newTag: )(?P<tag>\S+)"
)
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def set_image(kustomization: Path, name: str, tag: str) -> bool:
    """True if the file changed."""
    text = kustomization.read_text()
    updated, count = IMAGE_ENTRY.subn(rf"\g<1>{name}\g<3>{tag}", text)
    if count != 1:
        raise SystemExit(f"error: {kustomization} has no single fraud-predictor images entry")
    kustomization.write_text(updated)
    return updated != text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="image repository, e.g. ghcr.io/acme/fraud-predictor")
    parser.add_argument("tag", help="immutable tag, e.g. the commit SHA")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    if not TAG.match(args.tag) or args.tag == "latest":
        print(f"error: {args.tag!r} is not a pinned image tag", file=sys.stderr)
        return 2
    for deployable in DEPLOYABLES:
        path = args.root / deployable / "kustomization.yaml"
        changed = set_image(path, args.name.lower(), args.tag)
        print(f"{deployable}: {args.name.lower()}:{args.tag}{'' if changed else ' (unchanged)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
