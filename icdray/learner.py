"""GRPO learner: DeepSpeed engines in plain Ray actors (one data-parallel rank each).

    controller --update(my rows of the step, batch totals)--> Learner x W
        per micro-batch: forward (log-probs of the sampled tokens) -> grpo.policy_loss -> backward
        one optimizer step per GRPO step (DeepSpeed averages gradients across ranks)
    controller --export_weights--> rank 0: merged state dict (HF names) -> rollout workers

Why an actor group and not a loop inside Ray Train: GRPO's learner does not own its loop, the
controller feeds it a batch every step after generation and scoring. With `TorchTrainer.fit()` the
controller would have to live inside rank 0 and every other phase would hide inside a training
function. Plain actors keep the controller a short readable loop (the OpenRLHF/veRL shape); the price
is that checkpoints and resume are ours: every rank saves its DeepSpeed shards under one step folder
and the controller commits the step only once all ranks have saved (see `controller.py`).

Batch layout (the one TRL uses): prompts left-padded, completions right-padded, so every row's
completion occupies the last T positions and the model only computes logits there.
Left out: sequence packing, reference-model offload, tensor/pipeline parallelism.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdray import grpo, models
from icdray.config import GRPOConfig


@dataclass(frozen=True)
class Experience:
    """One sampled answer ready for the learner."""

    prompt_ids: list[int]  # (P,) chat-templated prompt
    completion_ids: list[int]  # (T,) sampled answer tokens
    sampler_logprobs: list[float]  # (T,) log-probs the rollout engine reported
    advantage: float


def collate(rows: list[Experience], pad_id: int) -> dict[str, Any]:
    """Pad a micro-batch: prompts on the left, completions on the right (see the module docstring)."""
    import torch

    p = max(len(r.prompt_ids) for r in rows)
    t = max(1, max(len(r.completion_ids) for r in rows))
    b = len(rows)
    ids = torch.full((b, p + t), pad_id, dtype=torch.long)  # (B, P+T)
    attn = torch.zeros((b, p + t), dtype=torch.long)  # (B, P+T)
    mask = torch.zeros((b, t), dtype=torch.float32)  # (B, T) real completion tokens
    old = torch.zeros((b, t), dtype=torch.float32)  # (B, T) sampler log-probs
    for i, r in enumerate(rows):
        n, m = len(r.prompt_ids), len(r.completion_ids)
        ids[i, p - n : p] = torch.tensor(r.prompt_ids)
        ids[i, p : p + m] = torch.tensor(r.completion_ids, dtype=torch.long)
        attn[i, p - n : p + m] = 1
        mask[i, :m] = 1
        old[i, :m] = torch.tensor(r.sampler_logprobs[:m])
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B, P+T) every row starts at position 0
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": positions,
        "completion_ids": ids[:, p:],  # (B, T)
        "completion_mask": mask,
        "sampler_logprobs": old,
        "advantages": torch.tensor([r.advantage for r in rows], dtype=torch.float32),  # (B,)
    }


def token_logprobs(model: Any, batch: dict[str, Any], temperature: float = 1.0) -> Any:
    """(B, T) log-probs of the completion tokens under `model` (logits only where needed)."""
    import torch

    t = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=t + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float() / (temperature or 1.0)  # (B, T, V): position j predicts j+1
    return torch.log_softmax(logits, dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def merged_state_dict(module: Any) -> dict[str, Any]:
    """HF-named full weights; LoRA deltas added (W + scale * B @ A) without touching the trained model."""
    import torch

    if not hasattr(module, "get_base_model"):  # full fine-tune: the model's own state dict
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    base = module.get_base_model()
    deltas = {}
    for name, sub in base.named_modules():
        if hasattr(sub, "get_delta_weight") and hasattr(sub, "base_layer"):
            with torch.no_grad():
                deltas[f"{name}.weight"] = sub.get_delta_weight("default")
    out = {}
    for k, v in base.state_dict().items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        out[k] = (v + deltas[k] if k in deltas else v).detach().clone()
    return out


class Learner:
    """One DeepSpeed rank. The controller creates `learner_workers` of these as Ray actors."""

    def __init__(self, cfg: GRPOConfig, model_path: str, rank: int, world: int, master: str) -> None:
        import deepspeed
        import torch

        from icdray import sft

        self.cfg = cfg
        self.rank, self.world = rank, world
        torch.set_num_threads(cfg.learner_threads or max(1, int(cfg.learner_cpus)))
        addr, port = master.rsplit(":", 1)
        os.environ.update(
            MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
        )
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cfg.use_gpu else "gloo", auto_mpi_discovery=False, verbose=False
        )
        model = models.trainable(model_path, self.cfg)
        self.tok_pad = _pad_id(model_path)
        self.ref = None
        if self.cfg.beta:  # the starting policy, frozen: KL anchor
            from transformers import AutoModelForCausalLM

            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, self.cfg.dtype))
            self.ref.eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=sft.ds_config(
                self.cfg.zero_stage, self.cfg.offload, self.cfg.dtype, self.cfg.micro_batch_size, 1
            ),
        )

    def update(
        self, rows: list[Experience], n_micro: int, total_tokens: int, total_rows: int
    ) -> dict[str, float]:
        """One optimizer step on this rank's rows, as `n_micro` micro-batches (equal on every rank)."""
        import torch

        cfg, engine = self.cfg, self.engine
        engine.train()
        t0 = time.time()
        mbs = cfg.micro_batch_size
        chunks = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
        # ranks with fewer rows run weight-0 passes so every rank makes the same collective calls
        chunks += [[]] * (n_micro - len(chunks))
        sums = {"loss": 0.0, "clip": 0.0, "kl": 0.0, "ratio": 0.0, "gap": 0.0, "tokens": 0.0}
        for epoch in range(cfg.ppo_epochs):
            old_lps = [] if epoch == 0 and cfg.ppo_epochs > 1 else None
            if old_lps is not None:  # several passes: freeze the pre-update policy's log-probs first
                with torch.no_grad():
                    old_lps = [
                        token_logprobs(engine, collate(c, self.tok_pad), cfg.temperature) if c else None
                        for c in chunks
                    ]
            for k, chunk in enumerate(chunks):
                engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
                real = bool(chunk)
                batch = {x: y.to(engine.device) for x, y in collate(chunk or rows[:1], self.tok_pad).items()}
                lp = token_logprobs(engine, batch, cfg.temperature)  # (B, T)
                old = lp.detach() if not old_lps or old_lps[k] is None else old_lps[k]
                ref = None
                if self.ref is not None:
                    with torch.no_grad():
                        ref = token_logprobs(self.ref, batch, cfg.temperature)
                out = grpo.policy_loss(
                    lp,
                    old,
                    batch["advantages"],
                    batch["completion_mask"],
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    beta=cfg.beta,
                    ref_logprobs=ref,
                    loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens,
                )
                n_tok = float(batch["completion_mask"].sum())
                share = (
                    (n_tok / max(1, total_tokens))
                    if cfg.loss_type == "token"
                    else len(chunk) / max(1, total_rows)
                )
                # DeepSpeed averages gradients over ranks: x world undoes it, so the step's gradient is the
                # gradient of the loss over the whole batch
                engine.backward(out.loss * (share * self.world if real else 0.0), scale_wrt_gas=False)
                if real and epoch == 0:
                    gap = ((lp.detach() - batch["sampler_logprobs"]).abs() * batch["completion_mask"]).sum()
                    sums["loss"] += float(out.loss.detach()) * share
                    sums["clip"] += out.clip_fraction * n_tok
                    sums["kl"] += out.kl * n_tok
                    sums["ratio"] += out.ratio_mean * n_tok
                    sums["gap"] += float(gap)
                    sums["tokens"] += n_tok
            engine.step()
        n = max(1.0, sums["tokens"])
        return {
            "loss": sums["loss"],
            "clip_fraction": sums["clip"] / n,
            "kl": sums["kl"] / n,
            "ratio_mean": sums["ratio"] / n,
            "sampler_logprob_gap": sums["gap"]
            / n,  # mean |learner - sampler| per token: stale weights show here
            "tokens": sums["tokens"],
            "seconds": time.time() - t0,
        }

    def logprobs(self, rows: list[Experience]) -> list[list[float]]:
        """The current policy's log-probs of each row's completion tokens (no update)."""
        import torch

        self.engine.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), self.cfg.micro_batch_size):
                chunk = rows[i : i + self.cfg.micro_batch_size]
                batch = {k: v.to(self.engine.device) for k, v in collate(chunk, self.tok_pad).items()}
                lp = token_logprobs(self.engine, batch, self.cfg.temperature).cpu()
                out += [lp[j, : len(r.completion_ids)].tolist() for j, r in enumerate(chunk)]
        return out

    def export_weights(self) -> dict[str, Any]:
        """Full merged weights for the rollout engines (every rank joins the ZeRO-3 gather)."""
        import deepspeed

        params = list(self.engine.module.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if self.cfg.zero_stage == 3 else None
        if gather:
            gather.__enter__()
        try:
            return merged_state_dict(self.engine.module) if self.rank == 0 else {}
        finally:
            if gather:
                gather.__exit__(None, None, None)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers from the learner's own model (the weight-sync check compares these)."""
        import torch

        module = self.engine.module
        module.eval()
        out = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                gen = module.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.tok_pad,
                    use_cache=True,
                )
                out.append(gen[0, ids.shape[1] :].tolist())
        return out

    def save(self, folder: str, client_state: dict[str, Any]) -> None:
        import torch

        self.engine.save_checkpoint(folder, tag="ds", client_state=client_state)
        torch.save(torch.get_rng_state(), Path(folder) / f"rng-rank{self.rank}.pt")

    def load(self, folder: str) -> dict[str, Any]:
        import torch

        _, client = self.engine.load_checkpoint(folder, tag="ds")
        torch.set_rng_state(torch.load(Path(folder) / f"rng-rank{self.rank}.pt"))
        return client or {}

    def save_model(self, out: str, source_path: str) -> None:
        """Rank 0 writes the merged model as an HF folder (weights + tokenizer) that any stage loads."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        weights = self.export_weights()
        if self.rank != 0:
            return
        model = AutoModelForCausalLM.from_pretrained(source_path)
        model.load_state_dict(weights, strict=False)
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(source_path).save_pretrained(out)


def _pad_id(model_path: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
