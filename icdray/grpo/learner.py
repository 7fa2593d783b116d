"""GRPO learner: DeepSpeed engines in plain Ray actors (one data-parallel rank each).

    controller --update(my groups of the step, batch totals)--> Learner x W
        per micro-batch: forward (log-probs of the sampled tokens; shared prompt; sampler's mask)
                         -> algo.policy_loss -> backward
        one optimizer step per pass (`ppo_epochs` passes per GRPO step; DeepSpeed averages across ranks)
    controller --export_weights--> rank 0: merged state dict (HF names) -> rollout workers

Why an actor group and not a loop inside Ray Train: GRPO's learner does not own its loop, the
controller feeds it a batch every step after generation and scoring. With `TorchTrainer.fit()` the
controller would have to live inside rank 0 and every other phase would hide inside a training
function. Plain actors keep the controller a short readable loop (the OpenRLHF/veRL shape); the price
is that checkpoints and resume are ours: every rank saves its DeepSpeed shards under one step folder
and the controller commits the step only once all ranks have saved (see `loop.py`).

Layouts (`packing.py`): with `grpo.shared_prefix` (default) a group's G answers are scored in one row
behind one copy of the prompt; otherwise each answer is its own padded row (TRL's layout).
Old policy: the sampler's log-probs (`grpo.old_logprobs: sampler`, exact when the sampler's weights and
mask are the learner's) or the learner's own pre-update log-probs (`learner`), optionally with a
truncated importance weight min(pi_learner / pi_sampler, `tis_cap`) for sampler/learner mismatch.
Left out: reference-model offload, tensor/pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdray import chat, training
from icdray.config import GRPOConfig
from icdray.grammar import AnswerConstraint
from icdray.grpo import algo, packing


@dataclass(frozen=True)
class Experience:
    """One sampled answer ready for the learner."""

    prompt_ids: list[int]  # (P,) chat-templated prompt
    completion_ids: list[int]  # (T,) sampled answer tokens
    sampler_logprobs: list[float]  # (T,) log-probs the rollout engine reported
    advantage: float
    token_advantages: list[float] | None = None  # (T,) item credit (grpo/credit.py); None: `advantage`


def _advantages(rows: list[Experience], members: list[int], t: int) -> Any:
    """(K, T) advantages of a micro-batch's rows in layout order (zeros for a padding pass)."""
    import torch

    out = torch.zeros((len(members), t))
    if not rows:
        return out
    for row, m in enumerate(members):
        r = rows[m]
        if r.token_advantages is None:
            out[row] = r.advantage
        else:
            n = min(t, len(r.token_advantages))
            out[row, :n] = torch.tensor(r.token_advantages[:n])
    return out


def micro_batches(rows: list[Experience], cfg: GRPOConfig) -> list[list[int]]:
    """Row indices of each micro-batch: a (split) group when the prompt is shared, else `micro_batch_size` rows."""
    if not cfg.shared_prefix:
        mbs = cfg.micro_batch_size
        return [list(range(i, min(i + mbs, len(rows)))) for i in range(0, len(rows), mbs)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r.prompt_ids), []).append(i)
    out = []
    for prompt, members in groups.items():
        lengths = [len(rows[i].completion_ids) for i in members]
        out += [
            [members[j] for j in part]
            for part in packing.split_group(len(prompt), lengths, cfg.max_packed_tokens)
        ]
    return out


class Learner:
    """One DeepSpeed rank. The controller creates `learner_workers` of these as Ray actors."""

    def __init__(
        self,
        cfg: GRPOConfig,
        model_path: str,
        rank: int,
        world: int,
        master: str,
        constraint: AnswerConstraint | None = None,
    ) -> None:
        import deepspeed
        import torch
        from transformers import AutoConfig, AutoTokenizer

        if cfg.shared_prefix and cfg.prefix_layout not in ("cache", "mask"):
            raise ValueError(f"grpo.prefix_layout must be cache or mask, got {cfg.prefix_layout!r}")
        if cfg.shared_prefix and cfg.prefix_layout == "cache" and cfg.gradient_checkpointing:
            raise ValueError(
                "grpo.prefix_layout=cache cannot run with gradient checkpointing (a recomputed layer would extend "
                "the prompt's KV cache twice): set grpo.prefix_layout=mask or grpo.gradient_checkpointing=false"
            )
        self.cfg = cfg
        self.rank, self.world = rank, world
        torch.set_num_threads(cfg.learner_threads or max(1, int(cfg.learner_cpus)))
        addr, port = master.rsplit(":", 1)
        os.environ.update(
            MASTER_ADDR=addr, MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
        )
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        deepspeed.init_distributed(
            dist_backend="nccl" if cfg.use_gpu else "gloo", auto_mpi_discovery=False, verbose=False
        )
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad = chat.pad_id(tok)
        self.replay = None
        if constraint is not None:
            from icdray.grpo.masks import MaskReplay

            vocab = AutoConfig.from_pretrained(model_path).vocab_size
            stops = chat.eos_ids(tok, _generation_config(model_path))
            self.replay = MaskReplay(
                tok, constraint, vocab, stops, cfg.engine.no_repeat_codes, cfg.engine.note_quotes
            )
        model = training.trainable(model_path, cfg)
        self.ref = None
        if cfg.beta:  # the starting policy, frozen: KL anchor
            from transformers import AutoModelForCausalLM

            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
            self.ref.eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = training.optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=training.ds_config(cfg.zero_stage, cfg.offload, cfg.dtype, cfg.micro_batch_size, 1),
        )

    # ------------------------------------------------------------------------------------ scoring

    def _batch(self, rows: list[Experience]) -> tuple[packing.Batch, Any, Any, Any]:
        """Layout, sampler log-probs (K, T), the sampler's token mask (N, V) or None, forced tokens (K, T)."""
        import torch

        items = [packing.Completion(r.prompt_ids, r.completion_ids) for r in rows]
        batch = (
            packing.pack(items, self.pad, self.cfg.max_packed_tokens)
            if self.cfg.shared_prefix
            else packing.pad(items, self.pad)
        )
        k, t = batch.completion_mask.shape
        sampler = torch.zeros((k, t))
        for row, m in enumerate(batch.members):
            lps = rows[m].sampler_logprobs
            sampler[row, : len(lps)] = torch.tensor(lps[:t])
        allowed, forced = None, torch.zeros((k, t))
        if self.replay is not None:
            masks = []
            for row, m in enumerate(batch.members):
                mask, _ = self.replay.allowed(rows[m].completion_ids, rows[m].prompt_ids)
                masks.append(mask)
                forced[row, : mask.shape[0]] = (mask.sum(-1) == 1).float()
            allowed = torch.cat(masks) if masks else None
        return batch, sampler, allowed, forced

    def _logprobs(self, model: Any, batch: packing.Batch, allowed: Any) -> Any:
        dev = self.engine.device
        moved = packing.Batch(
            batch.input_ids.to(dev),
            batch.position_ids.to(dev),
            batch.attention_mask.to(dev),
            batch.logit_index.to(dev),
            batch.gather.to(dev),
            batch.completion_ids.to(dev),
            batch.completion_mask.to(dev),
            batch.members,
        )
        return packing.token_logprobs(
            model, moved, self.cfg.temperature, None if allowed is None else allowed.to(dev)
        )

    # ------------------------------------------------------------------------------------- update

    def update(
        self, chunks: list[list[Experience]], n_micro: int, total_tokens: int, total_rows: int
    ) -> dict[str, float]:
        """`ppo_epochs` optimizer steps over this rank's micro-batches (`n_micro` on every rank)."""
        import torch

        cfg, engine = self.cfg, self.engine
        engine.train()
        t0 = time.time()
        # ranks with fewer micro-batches run weight-0 passes so every rank makes the same collective calls
        padded = chunks + [[]] * (n_micro - len(chunks))
        dummy = next(c for c in chunks if c) if any(chunks) else None
        prepared = [self._batch(c or [dummy]) if (c or dummy) else None for c in padded]
        frozen: list[Any] = [None] * len(padded)  # the pre-update policy's log-probs, kept for every pass
        grad_norm = float("nan")
        sums = {
            "loss": 0.0,
            "clip": 0.0,
            "kl": 0.0,
            "ratio": 0.0,
            "gap": 0.0,
            "tokens": 0.0,
            "forced": 0.0,
            "tis": 0.0,
            "clip_last": 0.0,
            "tokens_last": 0.0,
            "all": 0.0,
        }
        for epoch in range(cfg.ppo_epochs):
            for k, prep in enumerate(prepared):
                if prep is None:
                    continue
                batch, sampler, allowed, forced = prep
                real = bool(padded[k])
                engine.set_gradient_accumulation_boundary(k == len(prepared) - 1)
                lp = self._logprobs(engine, batch, allowed)  # (K, T)
                dev = lp.device
                cmask = batch.completion_mask.to(dev)
                # forced tokens (one legal choice) carry no gradient and no information: out of the loss
                live = cmask * (1 - forced.to(dev))
                sampler = sampler.to(dev)
                if epoch == 0:
                    frozen[k] = lp.detach()
                old = sampler if cfg.old_logprobs == "sampler" else frozen[k]
                weight = None
                if cfg.tis_cap > 0:
                    weight = algo.tis_weights(frozen[k], sampler, cfg.tis_cap)
                ref = None
                if self.ref is not None:
                    with torch.no_grad():
                        ref = self._logprobs(self.ref, batch, allowed)
                advantages = _advantages(padded[k] if real else [], batch.members, lp.shape[1]).to(dev)
                out = algo.policy_loss(
                    lp,
                    old,
                    advantages,
                    live,
                    clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high,
                    beta=cfg.beta,
                    ref_logprobs=ref,
                    loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens,
                    token_weights=weight,
                )
                n_tok = float(live.sum())
                share = (
                    n_tok / max(1, total_tokens)
                    if cfg.loss_type == "token"
                    else len(batch.members) / max(1, total_rows)
                )
                # DeepSpeed averages gradients over ranks: x world undoes it, so the step's gradient is the
                # gradient of the loss over the whole batch
                engine.backward(out.loss * (share * self.world if real else 0.0), scale_wrt_gas=False)
                if not real:
                    continue
                if epoch == 0:
                    gap = ((lp.detach() - sampler).abs() * cmask).sum()
                    sums["loss"] += float(out.loss.detach()) * share
                    sums["clip"] += out.clip_fraction * n_tok
                    sums["kl"] += out.kl * n_tok
                    sums["ratio"] += out.ratio_mean * n_tok
                    sums["gap"] += float(gap)
                    sums["tokens"] += n_tok
                    sums["all"] += float(cmask.sum())
                    sums["forced"] += float((forced.to(dev) * cmask).sum())
                    if weight is not None:
                        sums["tis"] += float((weight * live).sum())
                if epoch == cfg.ppo_epochs - 1:
                    sums["clip_last"] += out.clip_fraction * n_tok
                    sums["tokens_last"] += n_tok
            engine.step()
            if epoch == 0:
                norm = engine.get_global_grad_norm()  # before clipping to 1
                grad_norm = float("nan") if norm is None else float(norm)
        n = max(1.0, sums["tokens"])
        return {
            "loss": sums["loss"],
            "clip_fraction": sums["clip"] / n,
            "clip_fraction_last_pass": sums["clip_last"] / max(1.0, sums["tokens_last"]),
            "kl": sums["kl"] / n,
            "ratio_mean": sums["ratio"] / n,
            # mean |learner - sampler| per token over every sampled token: stale weights or a wrong mask show here
            "sampler_logprob_gap": sums["gap"] / max(1.0, sums["all"]),
            "forced_fraction": sums["forced"] / max(1.0, sums["all"]),
            "tis_weight_mean": sums["tis"] / n if cfg.tis_cap > 0 else 1.0,
            "tokens": sums["all"],
            "grad_norm": grad_norm,
            "seconds": time.time() - t0,
        }

    def logprobs(self, rows: list[Experience], masked: bool = True) -> list[list[float]]:
        """The current policy's log-probs of each row's completion tokens (no update); `masked=False`
        scores them without the sampler's mask (what a learner that ignores the grammar would see)."""
        import torch

        self.engine.eval()
        out: list[list[float]] = [[] for _ in rows]
        with torch.no_grad():
            for idx in micro_batches(rows, self.cfg):
                chunk = [rows[i] for i in idx]
                batch, _, allowed, _ = self._batch(chunk)
                lp = self._logprobs(self.engine, batch, allowed if masked else None).cpu()
                for row, m in enumerate(batch.members):
                    out[idx[m]] = lp[row, : len(chunk[m].completion_ids)].tolist()
        return out

    # -------------------------------------------------------------------------------- weights, state

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

    def open_weight_channel(self, address: str, world: int, backend: str, bucket_mb: int) -> list[Any]:
        """Rank 0 joins the broadcast group (grpo.weight_sync=broadcast) as its sender and returns the parameter
        list the receivers allocate (every rank is called: the others only join the gather)."""
        from icdray.grpo import weights

        state = self.export_weights()  # every rank joins a ZeRO-3 gather; rank 0 gets the weights
        if self.rank != 0:
            return []
        meta = weights.describe(state)
        del state
        self.channel = weights.Channel(address, 0, world, backend, bucket_mb)
        self.weight_meta = meta
        return meta

    def broadcast_weights(self) -> int:
        """Send the merged weights to every rollout worker of the group; returns the bytes sent."""
        state = self.export_weights()  # every rank joins a ZeRO-3 gather
        return self.channel.send(state, self.weight_meta) if self.rank == 0 else 0

    def digest(self) -> str:
        """sha256 of this rank's full weights (ranks of one run must agree after every step)."""
        return training.params_digest(self.engine.module)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy answers from the learner's own model (the weight-sync check compares these)."""
        import torch

        module = self.engine.module
        module.eval()
        out = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=self.engine.device)
                gen = module.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.pad,
                    use_cache=True,
                )
                out.append(gen[0, ids.shape[1] :].tolist())
        return out

    def save(self, folder: str, client_state: dict[str, Any]) -> None:
        """This rank's DeepSpeed shards and RNG state into `folder` (a local path or a URI: written to a local
        temporary folder first, then uploaded; ranks on other nodes upload their own files)."""
        import torch

        with _local(folder, upload=True) as here:
            self.engine.save_checkpoint(here, tag="ds", client_state=client_state)
            torch.save(torch.get_rng_state(), Path(here) / f"rng-rank{self.rank}.pt")

    def load(self, folder: str) -> dict[str, Any]:
        import torch

        with _local(folder, download=True) as here:
            _, client = self.engine.load_checkpoint(here, tag="ds")
            torch.set_rng_state(torch.load(Path(here) / f"rng-rank{self.rank}.pt"))
        return client or {}

    def save_model(self, out: str, source_path: str) -> None:
        """Rank 0 writes the merged model as an HF folder (weights + tokenizer) that any stage loads."""
        weights = self.export_weights()
        if self.rank == 0:
            _write_hf(out, source_path, weights)

    def copy_model(self, out: str, source: str) -> None:
        """Rank 0 writes the HF folder `source` (the start model, or a kept step's export) as the output."""
        if self.rank == 0:
            with _local(source, download=True) as src:
                _write_hf(out, src)


def _write_hf(out: str, source: str, weights: dict[str, Any] | None = None) -> None:
    """The HF folder `source` (a local path), with `weights` loaded over it when given, written to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    with _local(out, upload=True) as here:
        model.save_pretrained(here, safe_serialization=True)
        AutoTokenizer.from_pretrained(source).save_pretrained(here)


@contextlib.contextmanager
def _local(folder: str, upload: bool = False, download: bool = False) -> Iterator[str]:
    """`folder` itself when it is local; else a temporary local folder synced with it."""
    from icdray import storage

    if not storage.is_uri(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield folder
        return
    tmp = tempfile.mkdtemp(prefix="icdray-ckpt-")
    try:
        if download:
            storage.download_dir(folder, tmp)
        yield tmp
        if upload:
            storage.upload_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def _generation_config(model_path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None
