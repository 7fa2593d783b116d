"""GRPO speed on one machine: vLLM rollout actor vs transformers generate, icdray step vs TRL GRPOTrainer.

    python benchmarks/grpo_step.py --steps 4 --prompts 2 --group 4 --tokens 64

Everything runs in one process tree on the same model (smollm2-135m, fp32, LoRA r16 on all linear
layers), the same prepared demo prompts (notes cut to `--note-tokens`), group size, completion length,
learning rate and reward (`reward.score_batch`, default weights):
(a) rollout tokens/s: a RolloutWorker actor with the vLLM engine vs one with transformers `generate`
    (same prompts, n = group, sampled), warm-up round excluded. Target >= 1.0x.
(b) wall time per GRPO step: `icdray grpo` (vLLM rollout actor, reward actor, DeepSpeed learner actor,
    weight sync every step) vs TRL 1.16 `GRPOTrainer` (use_vllm=False: TRL's vLLM path supports vLLM
    <= 0.31 only), mean over the steps after the first. Target <= 1.0x, with icdray's phase breakdown.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from icdray.rollout import RolloutWorker, SamplingSpec

from icdray import controller, metrics, models, prepare, reward
from icdray.config import PrepareConfig, RayConfig, load_config
from icdray.demo_data import write_demo
from icdray.runtime import ensure_ray


def rollout_speed(path: str, rounds: list[list[list[int]]], spec: SamplingSpec) -> dict[str, float]:
    """Tokens/s over rounds[1:] (rounds[0] warms up); every round has new notes, as GRPO steps do."""
    import ray

    out = {}
    for backend in ("vllm", "hf"):
        settings = {"threads_bind": "0-1", "threads": 2, "kv_cache_gb": 1}
        w = ray.remote(RolloutWorker).options(num_cpus=1).remote(path, backend, settings)
        ray.get(w.generate.remote(rounds[0], spec))  # warm-up
        t, tokens = time.time(), 0
        for r, prompt_ids in enumerate(rounds[1:]):
            groups = ray.get(w.generate.remote(prompt_ids, SamplingSpec(**{**spec.__dict__, "seed": r})))
            tokens += sum(len(s.token_ids) for g in groups for s in g)
        out[backend] = tokens / (time.time() - t)
        ray.kill(w)
    return out


def icdray_steps(store: str, args: argparse.Namespace) -> list[dict]:
    cfg = load_config(
        None,
        [
            f"storage={store}",
            f"grpo.model={args.model}",
            f"grpo.steps={args.steps}",
            f"grpo.prompts_per_step={args.prompts}",
            f"grpo.group_size={args.group}",
            f"grpo.max_new_tokens={args.tokens}",
            "grpo.val_every=0",
            f"grpo.checkpoint_every={10**6}",
            "grpo.learner_threads=2",
            "grpo.micro_batch_size=2",
            "grpo.lr=1e-5",
            "grpo.skip_zero_variance=false",  # TRL updates on every group: same work on both sides
        ],
    )
    return controller.run(cfg, output=os.path.join(store, "bench-grpo")).history


def trl_steps(path: str, notes: list[controller.Note], args: argparse.Namespace) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from icdray import prompts

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [
        {"prompt": prompts.build_messages(n.note, []), "gold_codes": n.codes, "note": n.note}
        for n in notes[: args.prompts * args.steps]
    ]

    def coding_reward(completions, gold_codes, note, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward.score_batch(texts, gold_codes, note)[0]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()

        def on_step_end(self, *a, **k):
            times.append(time.time() - self.t)

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        processing_class=tok,
        reward_funcs=coding_reward,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        args=GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="icdray-trl-"),
            # one generation of prompts x group answers, then micro-batches of 2 and one optimizer step,
            # as icdray's learner does (gradient checkpointing on both sides)
            per_device_train_batch_size=2,
            gradient_accumulation_steps=args.prompts * args.group // 2,
            num_generations=args.group,
            max_completion_length=args.tokens,
            max_steps=args.steps,
            learning_rate=1e-5,
            beta=0.0,
            temperature=1.0,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=True,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            use_vllm=False,
            shuffle_dataset=False,
        ),
        callbacks=[StepTimer()],
    )
    trainer.train()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--note-tokens", type=int, default=300)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="icdray-grpo-bench-")
    write_demo(os.path.join(work, "mimic"), 200, seed=0, progress=False)
    ensure_ray(RayConfig(num_cpus=2))
    store = os.path.join(work, "store")
    prepare.run(PrepareConfig(max_note_tokens=args.note_tokens), store, os.path.join(work, "mimic"))
    path = models.resolve(args.model)
    tok = models.load(args.model)[1]
    cfg = load_config(None, [f"storage={store}"])
    notes = controller.load_notes(cfg, "train", tok, args.prompts * max(args.steps, 4))

    spec = SamplingSpec(n=args.group, temperature=1.0, max_tokens=args.tokens)
    p = args.prompts
    speed = rollout_speed(path, [[n.prompt_ids for n in notes[i * p : (i + 1) * p]] for i in range(4)], spec)
    history = icdray_steps(store, args)
    trl = trl_steps(path, notes, args)

    ours = [m["step_s"] for m in history[1:]]
    theirs = trl[1:]
    print(
        f"\nGRPO on {args.model}: {args.prompts} prompts x {args.group} samples x {args.tokens} tokens, "
        f"{args.steps} steps (first excluded), notes <= {args.note_tokens} tokens, 2 CPU cores\n"
    )
    print(
        metrics.format_table(
            {
                "rollout vLLM actor": {"tokens/s": speed["vllm"], "x": speed["vllm"] / speed["hf"]},
                "rollout transformers generate": {"tokens/s": speed["hf"], "x": 1.0},
            },
            ("tokens/s", "x"),
        )
    )
    phases = sorted({k for m in history[1:] for k in m["phase_s"]})
    mean = {p: sum(m["phase_s"].get(p, 0.0) for m in history[1:]) / len(ours) for p in phases}
    rows = {
        "icdray (vLLM + DeepSpeed actors)": {
            "s/step": sum(ours) / len(ours),
            "x TRL": sum(ours) / sum(theirs),
        },
        "TRL GRPOTrainer": {"s/step": sum(theirs) / len(theirs), "x TRL": 1.0},
    }
    print()
    print(metrics.format_table(rows, ("s/step", "x TRL")))
    print("\nicdray phases (s/step): " + ", ".join(f"{p} {v:.2f}" for p, v in mean.items()))


if __name__ == "__main__":
    main()
