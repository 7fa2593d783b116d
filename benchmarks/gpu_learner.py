"""The GRPO learner's step on one GPU, torch only: tokens/s and MFU of the shared-prefix and padded layouts.

A Qwen3-0.6B-shaped model (random weights: the FLOPs are the real model's) in bf16 scores G completions of
one prompt and back-propagates a policy loss, the learner's inner loop. Needs torch with CUDA and
transformers; no Ray, vLLM or DeepSpeed, so it runs on a bare GPU machine.

    python benchmarks/gpu_learner.py [--prompt 2048] [--group 8] [--tokens 512] [--peak-tflops 790]

MFU counts 6 x parameters x scored tokens (the prompt once for the shared layouts, G times when padded)
against the GPU's dense bf16 peak (H200: ~790 TFLOP/s without sparsity).
"""

from __future__ import annotations

import argparse
import time

import torch


def qwen3_0_6b() -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40_960,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to("cuda", torch.bfloat16)


def step(model, batch, adv) -> float:
    from icdray.grpo import algo, packing

    torch.cuda.synchronize()
    t = time.perf_counter()
    lp = packing.token_logprobs(model, batch)
    out = algo.policy_loss(lp.float(), lp.detach().float(), adv, batch.completion_mask.float())
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    a = ap.parse_args()
    from icdray.grpo import packing

    model = qwen3_0_6b()
    model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 150_000, (a.prompt,), generator=g).tolist()
    items = [
        packing.Completion(prompt, torch.randint(0, 150_000, (a.tokens,), generator=g).tolist())
        for _ in range(a.group)
    ]
    adv = torch.linspace(-1, 1, a.group, device="cuda")
    layouts = {
        "shared (KV broadcast)": (packing.share, a.prompt + a.group * a.tokens),
        "shared (4-D mask)": (packing.pack, a.prompt + a.group * a.tokens),
        "padded": (packing.pad, a.group * (a.prompt + a.tokens)),
    }
    budget = a.prompt + a.group * a.tokens + 8
    print(f"{torch.cuda.get_device_name(0)}; {n_params / 1e6:.0f}M parameters, bf16, gradient checkpointing")
    print(f"one group: prompt {a.prompt} + {a.group} x {a.tokens} answer tokens\n")
    print("| layout | s / group | answer tokens/s | MFU |")
    print("|---|---:|---:|---:|")
    for name, (make, scored) in layouts.items():
        kw = {} if make is packing.pad else {"budget": budget}
        batch = packing.to_device(make(items, pad_id=0, **kw), "cuda")
        step(model, batch, adv)  # warm-up
        s = sorted(step(model, batch, adv) for _ in range(a.repeats))[a.repeats // 2]
        mfu = 6 * n_params * scored / s / (a.peak_tflops * 1e12)
        print(f"| {name} | {s:.3f} | {a.group * a.tokens / s:,.0f} | {mfu:.1%} |")
    print(f"\npeak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
