"""Render every deployable with `kubectl kustomize`, for review in CI diffs.

uv run python scripts/render_manifests.py            # to rendered/<deployable>.yaml
uv run python scripts/render_manifests.py --stdout   # all of it to standard output
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOYABLES = {
    "kserve-knative": "manifests/overlays/knative",
    "kserve-standard": "manifests/overlays/standard",
    "fallback": "manifests/fallback",
}


def render(path: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("error: kubectl is needed (its built-in kustomize renders the manifests)")
    result = subprocess.run(
        [kubectl, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise SystemExit(f"error: {path} does not render: {result.stderr.strip()}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdout", action="store_true", help="print instead of writing files")
    parser.add_argument("--out", type=Path, default=ROOT / "rendered", help="output directory")
    args = parser.parse_args(argv)
    for name, path in DEPLOYABLES.items():
        text = render(path)
        if args.stdout:
            print(f"# ---- {name} ({path})\n{text}")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.yaml").write_text(text)
            objects = text.count("\n---\n") + 1
            print(f"{args.out / f'{name}.yaml'}: {objects} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
