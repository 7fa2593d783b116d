#!/usr/bin/env bash
# GPU smoke test for a machine with one CUDA GPU and the `gpu` extra installed (vllm on CUDA):
# a tiny-model SFT step (DeepSpeed on GPU), then GRPO steps with a vLLM rollout worker on CUDA and
# weight sync, printing tokens/s. About 3-5 minutes.
#   bash benchmarks/gpu_smoke.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d /tmp/icdray-gpu-smoke-XXXX)}
python - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "no CUDA GPU visible"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}, vllm {vllm.__version__}")
PY
icdray demo-data --out "$work/mimic" --admissions 200 --seed 0
icdray prepare --mimic "$work/mimic" --storage "$work" --set prepare.max_note_tokens=400
icdray distill --storage "$work" --set teacher.limit=32
icdray sft --storage "$work" --model smollm2-135m --set sft.use_gpu=true --set sft.num_workers=1 \
  --set sft.max_steps=2 --set sft.limit=16 --set sft.grad_accum=1 --set sft.dtype=bfloat16 --set sft.val_fraction=0
icdray grpo --storage "$work" --set grpo.use_gpu=true --set grpo.rollout_gpus=0.4 --set grpo.rollout_cpus=1 \
  --set grpo.learner_cpus=1 --set grpo.steps=3 --set grpo.prompts_per_step=4 --set grpo.group_size=4 \
  --set grpo.max_new_tokens=256 --set grpo.dtype=bfloat16 --set grpo.vllm_threads_bind=auto --set grpo.val_every=3 \
  --set grpo.val_notes=4 --set grpo.checkpoint_every=3
python - "$work" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(f"{sys.argv[1]}/checkpoints/grpo/metrics.jsonl")]
for m in rows:
    print(f"step {m['step']}: generate {m['generate_tokens_per_s']:.0f} tok/s, update {m.get('update_tokens_per_s', 0):.0f} tok/s, "
          f"sync {m['phase_s'].get('sync', 0):.2f}s, sampler-learner logprob gap {m.get('sampler_logprob_gap', float('nan')):.2e}")
PY
