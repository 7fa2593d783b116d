"""GRPO step time on one machine, side by side: icdray shared-prefix vs icdray padded vs TRL GRPOTrainer,
and the rollout engine's tokens/s against the machine's roofline.

    python benchmarks/grpo_step.py --steps 3 --prompts 2 --group 8 --tokens 256 --prompt-tokens 900

Same model (smollm2-135m, fp32, LoRA r16 on every linear layer, no gradient checkpointing), same
demo prompts (~`--prompt-tokens` chat-templated tokens: a demo note), group size, learning rate and
reward (`grpo.rewards.score_batch`). Every answer is exactly `--tokens` long on every side (vLLM
`min_tokens`, TRL `min_new_tokens`), so the three do the same work; unconstrained sampling (TRL has no
grammar without vLLM). Mean over the steps after the first:
(a) update tokens/s (completion tokens per second of learner time) and seconds per step;
    target: icdray's step <= 0.3x TRL's.
(b) rollout tokens/s of one RolloutWorker (vLLM) at a batch of >= 32 answers, against the roofline
    tokens/s = measured fp32 GEMM FLOP/s on these cores / (2 x parameters); target >= 60 %.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from icdray import grpo, models, prepare, results
from icdray.config import PrepareConfig, RayConfig, load_config
from icdray.demo_data import write_demo
from icdray.engine import SamplingSpec
from icdray.grpo import loop
from icdray.runtime import ensure_ray


def gemm_flops(threads: int = 2, n: int = 2048, reps: int = 5) -> float:
    """fp32 matmul FLOP/s on `threads` cores (the compute roofline of this machine)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):  # best of three: this VM's clock and memory speed vary from run to run
        a @ b
        t = time.time()
        for _ in range(reps):
            a @ b
        best = min(best, time.time() - t)
    return 2 * n**3 * reps / best


def read_bandwidth(threads: int = 2, mb: int = 256, reps: int = 10) -> float:
    """Bytes/s this machine streams from memory (a sum over a large tensor)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(mb * 1024 * 1024 // 4)
    best = float("inf")
    for _ in range(3):
        x.sum()
        t = time.time()
        for _ in range(reps):
            x.sum()
        best = min(best, time.time() - t)
    return x.numel() * 4 * reps / best


def rollout_speed(path: str, prompts: list[list[int]], group: int, tokens: int) -> float:
    """Tokens/s of one vLLM RolloutWorker generating len(prompts) x group answers (a warm-up round first)."""
    import ray

    from icdray.config import EngineConfig
    from icdray.grpo.rollout import RolloutWorker

    cfg = EngineConfig(
        constrained=False, no_repeat_codes=False, threads_bind="0-1", max_model_len=2048, kv_cache_gb=4
    )
    w = ray.remote(RolloutWorker).options(num_cpus=1).remote(path, cfg, None)
    spec = SamplingSpec(n=group, temperature=1.0, max_tokens=tokens, min_tokens=tokens)
    ray.get(w.generate.remote(prompts, spec))
    t = time.time()
    groups = ray.get(w.generate.remote(prompts, SamplingSpec(**{**spec.__dict__, "seed": 1})))
    speed = sum(len(s.token_ids) for g in groups for s in g) / (time.time() - t)
    ray.kill(w)
    return speed


def icdray_steps(store: str, args: argparse.Namespace, shared: bool) -> list[dict]:
    cfg = load_config(
        None,
        [
            f"storage={store}",
            f"grpo.model={args.model}",
            f"grpo.steps={args.steps}",
            f"grpo.prompts_per_step={args.prompts}",
            f"grpo.group_size={args.group}",
            f"grpo.max_new_tokens={args.tokens}",
            f"grpo.min_new_tokens={args.tokens}",
            f"inputs.max_prompt_tokens={args.prompt_tokens + 64}",
            "grpo.engine.constrained=false",
            "grpo.engine.max_model_len=2048",
            "grpo.engine.kv_cache_gb=4",
            "grpo.val_every=0",
            f"grpo.checkpoint_every={10**6}",
            "grpo.learner_threads=2",
            "grpo.micro_batch_size=2",
            "grpo.lr=1e-5",
            "grpo.extra_draws=0",
            "grpo.skip_zero_variance=false",  # TRL updates on every group: same work on both sides
            f"grpo.shared_prefix={'true' if shared else 'false'}",
        ],
    )
    out = os.path.join(store, f"bench-grpo-{'shared' if shared else 'padded'}")
    return grpo.run(cfg, output=out).history


def trl_steps(path: str, notes: list[loop.Note], args: argparse.Namespace) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from icdray import prompts
    from icdray.grpo import rewards

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    rows = [
        {"prompt": prompts.build_messages(n.note, []), "gold_codes": n.codes, "note": n.note}
        for n in notes[: args.prompts * args.steps]
    ]

    def coding_reward(completions, gold_codes, note, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rewards.score_batch(texts, gold_codes, note)[0]

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
            # one generation of prompts x group answers, then micro-batches of 2 and one optimizer step
            per_device_train_batch_size=2,
            gradient_accumulation_steps=args.prompts * args.group // 2,
            num_generations=args.group,
            max_completion_length=args.tokens,
            generation_kwargs={"min_new_tokens": args.tokens},
            max_steps=args.steps,
            learning_rate=1e-5,
            beta=0.0,
            temperature=1.0,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
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


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=900, help="target chat-templated prompt length")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--rollout-only", action="store_true", help="only the rollout engine's tokens/s")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="icdray-grpo-bench-")
    write_demo(os.path.join(work, "mimic"), 200, seed=0, progress=False)
    ensure_ray(RayConfig(num_cpus=2))
    store = os.path.join(work, "store")
    prepare.run(PrepareConfig(max_note_tokens=args.prompt_tokens), store, os.path.join(work, "mimic"))
    path = models.resolve(args.model)
    tok = models.load(args.model)[1]
    cfg = load_config(None, [f"storage={store}", f"inputs.max_prompt_tokens={args.prompt_tokens + 64}"])
    notes = loop.load_notes(cfg, "train", tok, 64)
    prompt_len = _mean([len(n.prompt_ids) for n in notes])

    flops = gemm_flops()
    model = models.load(args.model)[0]
    params = sum(p.numel() for p in model.parameters())
    roofline = flops / (2 * params)
    # decoding also streams the weights once per step and every sequence's KV cache once per token
    c = model.config
    kv_per_token = (
        2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    )
    batch = max(4, -(-32 // args.group)) * args.group
    context = prompt_len + args.tokens / 2
    bandwidth = read_bandwidth()
    memory_roofline = bandwidth / (4 * params / batch + context * kv_per_token)
    batch_prompts = [n.prompt_ids for n in notes[: max(4, -(-32 // args.group))]]
    speed = rollout_speed(path, batch_prompts, args.group, args.tokens)
    rollout_line = (
        f"\nrollout: one vLLM RolloutWorker, {len(batch_prompts)} prompts x {args.group} answers "
        f"= {len(batch_prompts) * args.group} sequences: {speed:.0f} tokens/s; roofline {roofline:.0f} tokens/s "
        f"({flops / 1e9:.0f} GFLOP/s fp32 GEMM / 2 x {params / 1e6:.1f} M parameters): {speed / roofline:.0%}; "
        f"memory roofline {memory_roofline:.0f} tokens/s ({bandwidth / 1e9:.0f} GB/s over the weights per step "
        f"and {context:.0f} tokens of KV per sequence): {speed / memory_roofline:.0%}"
    )
    if args.rollout_only:
        print(rollout_line)
        return

    runs = {
        "icdray shared-prefix": icdray_steps(store, args, True),
        "icdray padded": icdray_steps(store, args, False),
    }
    trl = [] if args.skip_trl else trl_steps(path, notes, args)
    answer_tokens = args.prompts * args.group * args.tokens
    table = []
    for name, hist in runs.items():
        h = hist[1:] or hist
        table.append(
            {
                "model": name,
                "s_per_step": _mean([m["step_s"] for m in h]),
                "update_s": _mean([m["phase_s"].get("update", 0.0) for m in h]),
                "generate_s": _mean([m["phase_s"].get("generate", 0.0) for m in h]),
                "update_tok_s": _mean([m.get("update_tokens_per_s", 0.0) for m in h]),
            }
        )
    if trl:
        table.append({"model": "TRL 1.16 GRPOTrainer", "s_per_step": _mean(trl[1:] or trl)})
    for row in table:
        row["x_trl"] = row["s_per_step"] / table[-1]["s_per_step"] if trl else None
    print(
        f"\nGRPO on {args.model}: {args.prompts} prompts x {args.group} answers x {args.tokens} tokens per step, "
        f"prompts of {prompt_len:.0f} tokens, {args.steps} steps (first excluded), 2 CPU cores; "
        f"{answer_tokens} answer tokens per step\n"
    )
    print(results.table(table, ("s_per_step", "update_s", "generate_s", "update_tok_s", "x_trl")))
    print(rollout_line)


if __name__ == "__main__":
    main()
