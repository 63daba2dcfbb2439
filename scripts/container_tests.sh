#!/usr/bin/env bash
# Build and run the image and the compose stack for real: `uv run pytest -m containers`
# with a container engine.
#
#   bash scripts/container_tests.sh        # .ci/run runs it as its second stage
#
# Engine: $CONTAINER_ENGINE if set, else Docker (with `docker compose`) when its daemon
# answers, else podman (with podman-compose). Nothing found: the tests skip and say why.
#
# CONTAINERS_DIR (default: unset) names container tooling for machines that cannot pull
# images: its setup.sh installs and configures podman, buildah and podman-compose (as root),
# its stand-ins.sh builds local images under the upstream names the Dockerfile and compose
# file use (containers/stand-ins.list), and its compose-up.sh brings the compose file up
# honouring depends_on conditions where podman-compose does not. Idempotent: a second run
# reuses packages, stand-ins and layers.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

if [ -n "${CONTAINERS_DIR:-}" ]; then
  [ -f "$CONTAINERS_DIR/setup.sh" ] || { echo "error: $CONTAINERS_DIR/setup.sh not found (CONTAINERS_DIR)" >&2; exit 2; }
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # netavark (podman's network backend) needs iptables, which setup.sh does not install.
  if ! command -v iptables >/dev/null 2>&1; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables >/dev/null
  fi
  $SUDO bash "$CONTAINERS_DIR/setup.sh"
  # The tooling's stand-ins plus the project's own list (containers/stand-ins.list), and the
  # ledger's PostgreSQL under its upstream name, built from Debian's package.
  $SUDO env LIST="$PWD/containers/stand-ins.list" bash "$CONTAINERS_DIR/stand-ins.sh"
  $SUDO podman build -q --pull=never --build-arg BASE=python:3.11.14-slim-bookworm \
    -t docker.io/library/postgres:15-bookworm containers/postgres
  export CONTAINER_ENGINE=podman COMPOSE_UP="$CONTAINERS_DIR/compose-up.sh"
  echo "[container_tests] podman and stand-ins ready in $((SECONDS - started)) s"
fi

if [ -z "${CONTAINER_ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    CONTAINER_ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    CONTAINER_ENGINE=podman
  fi
fi
if [ -n "${CONTAINER_ENGINE:-}" ]; then
  export CONTAINER_ENGINE
  echo "[container_tests] engine: $CONTAINER_ENGINE"
else
  echo "[container_tests] no container engine (docker with a running daemon, or podman): the tests skip"
fi

# podman builds OCI images by default and drops HEALTHCHECK; the Docker format keeps it.
export BUILDAH_FORMAT=docker
uv run pytest -m containers -p no:cacheprovider -rA "$@"
echo "[container_tests] done in $((SECONDS - started)) s"
