"""SFT throughput and peak memory for smollm2-135m: LoRA + ZeRO-2 vs full fine-tune, 1 vs 2 workers.

    python benchmarks/sft_throughput.py --steps 4 --seq-len 1024

Each configuration is one real `icdray sft` run (Ray Train + DeepSpeed ZeRO-2) on demo exemplars,
micro-batch 1, no gradient accumulation, sequences cut to `--seq-len` tokens. Tokens/s is the mean
over steps after the first (warm-up); peak memory is the largest worker's peak RSS. Target: LoRA
peak memory <= 0.5x the full fine-tune's.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from icdray import distill, prepare, sft
from icdray.config import PrepareConfig, RayConfig, load_config
from icdray.demo_data import write_demo
from icdray.runtime import ensure_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="icdray-sft-bench-")
    write_demo(os.path.join(work, "mimic"), 200, seed=0, progress=False)
    ensure_ray(RayConfig())
    store = os.path.join(work, "store")
    prepare.run(PrepareConfig(max_note_tokens=400), store, os.path.join(work, "mimic"))
    distill.run(load_config(None, [f"storage={store}", "teacher.limit=64"]))

    rows = []
    for lora in (True, False):
        for workers in (1, 2):
            name = f"{'lora' if lora else 'full'}-{workers}w"
            cfg = load_config(
                None,
                [
                    f"storage={store}",
                    f"sft.model={args.model}",
                    f"sft.lora={str(lora).lower()}",
                    "sft.zero_stage=2",
                    f"sft.num_workers={workers}",
                    f"sft.cpus_per_worker={2 // workers}",
                    f"sft.max_steps={args.steps}",
                    "sft.grad_accum=1",
                    "sft.micro_batch_size=1",
                    f"sft.max_seq_len={args.seq_len}",
                    "sft.val_fraction=0",
                    "sft.limit=32",
                    f"sft.lr={2e-4 if lora else 1e-5}",
                ],
            )
            result = sft.run(cfg, output=os.path.join(work, "out", name), run_name=name)
            history = sft.read_metrics(result.output)
            speed = [m["tokens_per_s"] for m in history[1:]] or [history[0]["tokens_per_s"]]
            rows.append((name, lora, workers, sum(speed) / len(speed), result.peak_rss_mb, result.last_loss))
            print(result.format(), flush=True)

    print(
        f"\nSFT {args.model}, ZeRO-2, {args.steps} steps, micro-batch 1, <= {args.seq_len} tokens, fp32, 2 CPU cores"
    )
    print("| run | LoRA | workers | tokens/s | peak RSS per worker (MB) |")
    print("|---|---|---:|---:|---:|")
    for name, lora, workers, tps, rss, _ in rows:
        print(f"| {name} | {'yes' if lora else 'no'} | {workers} | {tps:.0f} | {rss:.0f} |")
    peak = {(lora, w): rss for _, lora, w, _, rss, _ in rows}
    for w in (1, 2):
        print(
            f"LoRA / full peak memory, {w} worker(s): {peak[(True, w)] / peak[(False, w)]:.2f}x (target <= 0.5x)"
        )


if __name__ == "__main__":
    main()
