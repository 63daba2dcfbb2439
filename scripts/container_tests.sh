#!/usr/bin/env bash
# Build and run the image and the compose stack for real, with podman (no Docker engine
# needed): `uv run pytest -m containers` after setting podman up.
#
#   sudo scripts/container_tests.sh        # CI runs it as the second stage of .ci/run
#
# Uses the shared container tooling at $CONTAINERS_DIR (default ../shared/containers):
# setup.sh installs and configures podman, buildah and podman-compose; stand-ins.sh builds
# local images under the upstream names the Dockerfile and compose file use, for machines
# that cannot pull them. Idempotent: a second run reuses packages, stand-ins and layers.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTAINERS_DIR=${CONTAINERS_DIR:-$(cd .. && pwd)/shared/containers}
[ -f "$CONTAINERS_DIR/setup.sh" ] || { echo "error: $CONTAINERS_DIR/setup.sh not found (set CONTAINERS_DIR)" >&2; exit 2; }
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
started=$SECONDS

# netavark (podman's network backend) needs iptables, which setup.sh does not install.
if ! command -v iptables >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables >/dev/null
fi
$SUDO bash "$CONTAINERS_DIR/setup.sh"
# The shared stand-ins plus the project's own list (containers/stand-ins.list), and the
# ledger's PostgreSQL under its upstream name, built from Debian's package.
$SUDO env LIST="$PWD/containers/stand-ins.list" bash "$CONTAINERS_DIR/stand-ins.sh"
$SUDO podman build -q --pull=never --build-arg BASE=python:3.11.14-slim-bookworm \
  -t docker.io/library/postgres:15-bookworm containers/postgres
echo "[container_tests] podman and stand-ins ready in $((SECONDS - started)) s"

export BUILDAH_FORMAT=docker COMPOSE_UP="$CONTAINERS_DIR/compose-up.sh"
uv run pytest -m containers -p no:cacheprovider -rA "$@"
echo "[container_tests] done in $((SECONDS - started)) s"
