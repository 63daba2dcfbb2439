"""Pin the predictor image of every deployable to one tag and digest (the promote step).

    uv run python scripts/set_image.py ghcr.io/acme/fraud-predictor 3f9c2e1 \
        --digest sha256:4b1f...

Rewrites the `images:` entry named `fraud-predictor` in each deployable's
kustomization.yaml (what `kustomize edit set image` does) and nothing else, so the
commit that Argo CD syncs is a small change per deployable. With a digest, kustomize
renders `name:tag@digest`: the tag for people, the digest for the kubelet, so the pods run
exactly the image that was smoke-tested even if the tag is pushed again.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="image repository, e.g. ghcr.io/acme/fraud-predictor")
    parser.add_argument("tag", help="immutable tag, e.g. the commit SHA")
    parser.add_argument("--digest", help="the pushed image's digest, sha256:<64 hex>")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
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
