"""What the SFT and GRPO learners share: the trainable model, the DeepSpeed config, the schedule, digests.

Kept apart from both stages so neither imports the other. The optimizer is a torch one passed to
DeepSpeed, so nothing JIT-compiles on first use. Left out: mixed-precision loss scaling (fp32 on CPU,
bf16 on GPU needs none).
"""

from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any

from icdray import models


def trainable(model_path: str, cfg: Any) -> Any:
    """The model a learner trains: gradient checkpointing and LoRA adapters as `cfg` says.

    `cfg` is a stage config with the shared training fields (SFTConfig, GRPOConfig): seed, dtype,
    gradient_checkpointing, lora, lora_r, lora_alpha, lora_dropout, lora_targets (() = the family's),
    train_layers (N > 0: only the last N decoder layers and the final norm train; the backward pass then
    stops at the first of them, and an update moves a tenth of the weights or less).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # with frozen embeddings (LoRA) checkpointed blocks still need grads
    if cfg.train_layers:
        if cfg.lora:
            raise ValueError("train_layers and lora exclude each other: set one of them")
        decoder = model.get_decoder()
        if not 0 < cfg.train_layers <= len(decoder.layers):
            raise ValueError(
                f"train_layers={cfg.train_layers}, but the model has {len(decoder.layers)} layers"
            )
        model.requires_grad_(False)
        for module in [*decoder.layers[-cfg.train_layers :], decoder.norm]:
            module.requires_grad_(True)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        wanted = cfg.lora_targets or models.lora_targets(model.config)
        targets = [t for t in wanted if any(n.endswith(t) for n, _ in model.named_modules())]
        if not targets:
            raise ValueError(
                f"none of the LoRA targets {list(wanted)} is a module of {model.config.model_type}: "
                "set lora_targets to its linear layers' names"
            )
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def ds_config(
    zero_stage: int, offload: bool, dtype: str, micro_batch_size: int, grad_accum: int
) -> dict[str, Any]:
    """DeepSpeed config shared by the SFT and GRPO learners (the optimizer is passed in: `optimizer`)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload and zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ZeRO 1-2 shard SGD's state as they shard Adam's
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


OPTIMIZERS = ("adamw", "sgd")


def optimizer(name: str, params: Any, lr: float, weight_decay: float) -> Any:
    """The torch optimizer `name` over `params`.

    "adamw": Adam's first steps move every weight by about `lr` whatever the size of its gradient (the
    update is m/sqrt(v), about sign(g) while the moments hold one gradient). "sgd": plain gradient descent,
    each weight moves by lr x its gradient (DeepSpeed clips the gradient's norm to 1 first), so weights the
    batch says little about barely move.
    """
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 (multiplies the base learning rate)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def params_digest(module: Any) -> str:
    """A hash of every parameter's bytes: equal digests = bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def folder_digest(folder: str) -> str:
    """`params_digest` of an HF folder's saved weights (every `*.safetensors`, local or under a URI), read
    without building the model: two folders with equal digests hold bit-identical weights."""
    import hashlib
    import tempfile

    from safetensors import safe_open

    from icdray import storage

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="icdray-digest-") as tmp:
        if storage.is_uri(folder):
            storage.download_dir(folder, tmp)
            folder = tmp
        tensors = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no iter)
        if not tensors:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        for name, t in sorted(tensors.items()):
            h.update(name.encode())
            h.update(t.float().contiguous().numpy().tobytes())
    return h.hexdigest()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
