#!/usr/bin/env bash
# GPU checks and figures for a machine with CUDA GPUs.
#
#   bash benchmarks/gpu_smoke.sh [WORKDIR]
#
# Part 1 needs only torch (CUDA) and transformers: the gpu-marked learner tests (shared-prefix equality on
# CUDA, the bf16 log-prob and loss path) and the learner benchmark (tokens/s and MFU per layout).
# Part 2 needs the GPU environment (`bash cluster/install.sh gpu --dev`: Ray, vLLM for CUDA, DeepSpeed):
# the remaining gpu-marked tests (DeepSpeed SFT step, GRPO with vLLM on CUDA and the NCCL broadcast, a Serve
# request on a GPU replica), then a short SFT and GRPO run on the demo data printing SFT tokens/s, GRPO
# generation tokens/s per GPU, update tokens/s and weight-sync seconds. Part 2 is skipped when Ray or vLLM
# is missing. About 3 minutes for part 1 on one GPU, 10 for part 2.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/icdray-gpu-smoke-XXXX)}
py=${PYTHON:-python}

$py - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible: run this on a GPU machine"
print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
PY

echo "== part 1: torch-only checks"
$py -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "shared_prefix or bf16"
$py benchmarks/gpu_learner.py

if ! $py -c "import ray, vllm, deepspeed" 2>/dev/null; then
  echo "== part 2 skipped: Ray, vLLM or DeepSpeed is not installed (bash cluster/install.sh gpu)"
  exit 0
fi

echo "== part 2: the GPU stack"
$py -m pytest -q -p no:cacheprovider -s tests/test_gpu.py -k "not shared_prefix and not bf16"
icdray demo-data --out "$work/mimic" --admissions 300 --seed 0
icdray prepare --mimic "$work/mimic" --storage "$work"
icdray distill --storage "$work" --set teacher.limit=64
icdray sft --storage "$work" --model smollm2-135m --set sft.use_gpu=true --set sft.dtype=bfloat16 \
  --set sft.num_workers=1 --set sft.limit=64 --set sft.val_fraction=0
icdray grpo --storage "$work" --set grpo.use_gpu=true --set grpo.dtype=bfloat16 \
  --set grpo.engine.device=cuda --set grpo.engine.dtype=bfloat16 --set grpo.engine.enforce_eager=false \
  --set grpo.engine.gpu_memory_utilization=0.35 --set grpo.rollout_gpus=0.5 --set grpo.learner_gpus=0.5 --set grpo.rollout_cpus=2 \
  --set grpo.weight_sync=broadcast --set grpo.steps=4 --set grpo.prompts_per_step=16 --set grpo.group_size=8 \
  --set grpo.val_every=4 --set grpo.val_notes=16 --set grpo.checkpoint_every=4
$py - "$work" <<'PY'
import json, sys
root = sys.argv[1]
sft = [json.loads(x) for x in open(f"{root}/checkpoints/sft/metrics.jsonl")]
print(f"SFT: {sum(m['tokens_per_s'] for m in sft) / len(sft):.0f} tokens/s (mean of {len(sft)} steps)")
for m in (json.loads(x) for x in open(f"{root}/checkpoints/grpo/metrics.jsonl")):
    print(
        f"GRPO step {m['step']}: generate {m.get('generate_tokens_per_s', 0):.0f} tokens/s/GPU, "
        f"update {m.get('update_tokens_per_s', 0):.0f} tokens/s, sync {m['phase_s'].get('sync', 0):.2f} s"
    )
PY
