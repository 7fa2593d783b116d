"""SFT stage: fine-tune the student on teacher exemplars with Ray Train + DeepSpeed (+ PEFT LoRA).

    exemplars/ --(driver: chat template, tokenize, mask prompt tokens, length buckets)--> object store
    TorchTrainer(num_workers) -> train_loop: deepspeed.initialize(ZeRO stage, AdamW, warm-up + cosine)
        each optimizer step: grad_accum micro-batches of this rank's share -> engine.step()
        ray.train.report(metrics[, checkpoint]) every step; DeepSpeed checkpoint every N steps / epoch
    rank 0 at the end -> checkpoints/sft/ (merged HF model + tokenizer) and checkpoints/sft/adapter/ (LoRA)

Why the data goes through the object store rather than a Ray Data shard: resuming at step N+1 with
the same data order needs a replayable, deterministic plan of batches (bucketed by length, shuffled
per epoch from the seed). The driver builds it once; every rank takes its slice of every step.

Everything the loop needs arrives in its `config` argument. A lost worker (or the fault drill
`sft.fail_at_step`) makes Ray Train restart the group from the last reported checkpoint
(`FailureConfig(max_failures)`); re-running the job with the same storage resumes the same run.
Left out: sequence packing, multi-node NCCL tuning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from icdray import chat, layout, models, storage, training
from icdray.config import Config, InputConfig, SFTConfig

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that do not count in the loss (prompt, padding)


def _say(line: str) -> None:
    """One progress line from a Train worker. Ray Train patches `print` on its workers to write the
    line to stdout and log it again through the root logger, so the driver showed every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens: only the answer is learned
    hadm_id: int


def build_examples(
    table: Any, tok: Any, cfg: SFTConfig, inputs: InputConfig
) -> tuple[list[Example], list[Example], int]:
    """Train and validation examples (validation held out by patient hash) and the number dropped.

    Prompt tokens are labelled IGNORE: only the answer is learned.
    """
    train, val, dropped = [], [], 0
    for row in table.to_pylist():
        enc = chat.encode_example(
            tok,
            row["note"],
            row["medications"],
            row["answer"],
            cfg.max_seq_len,
            inputs.max_prompt_tokens,
            inputs.thinking,
        )
        if enc is None:
            dropped += 1
            continue
        ids, n_prompt = enc
        ex = Example(ids, [IGNORE] * n_prompt + ids[n_prompt:], row["hadm_id"])
        is_val = zlib.crc32(f"val:{row['subject_id']}".encode()) / 2**32 < cfg.val_fraction
        (val if is_val else train).append(ex)
    return train, val, dropped


def batch_plan(lengths: list[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), batches shuffled per epoch."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    random.Random(seed * 1000 + epoch).shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Left-padded batch: every answer ends at the last position, so logits are needed only for the last
    `keep` positions (the longest answer + 1), not over the whole prompt."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, width - n :] = torch.tensor(e.input_ids)
        labels[i, width - n :] = torch.tensor(e.labels)
        mask[i, width - n :] = 1
    answer = max(sum(x != IGNORE for x in e.labels) for e in examples)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),  # (B, T) every row starts at position 0
        "labels": labels,
        "keep": min(width, answer + 1),
    }


def answer_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean cross-entropy over answer tokens; logits computed only where an answer token is predicted."""
    import torch

    keep = batch["keep"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float()  # (B, keep-1, V): position j predicts j+1
    target = batch["labels"][:, -keep + 1 :] if keep > 1 else batch["labels"][:, :0]  # (B, keep-1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE
    )


def _to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------ train loop


def _quiet_report_log() -> None:
    """Ray Train logs every `report()` at INFO (the whole metrics dict) next to our step line: keep its
    warnings only. Its logger is named by its file's path."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: leave its logging as it is
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; everything comes from `config`."""
    import deepspeed
    import ray
    import ray.train
    import torch

    _quiet_report_log()
    cfg = SFTConfig(**config["sft"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    data = ray.get(config["data_ref"][0])
    train, val, pad_id = data["train"], data["val"], data["pad_id"]

    model = training.trainable(config["model_path"], cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.optimizer("adamw", params, cfg.lr, cfg.weight_decay)
    per_step = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = max(1, len(train) // per_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    warmup = int(total * cfg.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training.lr_lambda(s, total, warmup))
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses Ray Train's group
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=training.ds_config(
            cfg.zero_stage, cfg.offload, cfg.dtype, cfg.micro_batch_size, cfg.grad_accum
        ),
    )
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag="ds")
            step, history = int(client["step"]), list(client["history"])
            # each rank's own RNG: dropout masks continue exactly where they left off (ranks see different
            # sequence lengths, so their generators have drawn different amounts)
            torch.set_rng_state(torch.load(Path(d) / f"rng-rank{rank}.pt"))
        if rank == 0:
            _say(f"[sft] resumed from the checkpoint of step {step}")

    lengths = [len(e.input_ids) for e in train]
    device = engine.device
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        plan = batch_plan(lengths, cfg.micro_batch_size, cfg.seed, epoch)
        # micro-batches of this optimizer step for this rank: (grad_accum,) slices of the plan
        base = in_epoch * cfg.grad_accum * world
        mine = [plan[(base + a * world + rank) % len(plan)] for a in range(cfg.grad_accum)]
        t0 = time.time()
        losses, tokens = [], 0
        engine.train()
        for idx in mine:
            batch = _to(collate([train[i] for i in idx], pad_id), device)
            loss = answer_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
        step += 1
        if cfg.fail_at_step and step == cfg.fail_at_step and rank == min(1, world - 1):
            marker = storage.join(config["run_dir"], f"drill-fired-{cfg.fail_at_step}")
            if not storage.exists(marker):
                storage.write_text(marker, "fired")
                raise RuntimeError(f"fault drill: rank {rank} fails at step {step} (sft.fail_at_step)")
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": sum(losses) / len(losses),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens * world / max(1e-6, time.time() - t0),
            "peak_rss_mb": training.peak_rss_mb(),
        }
        end_of_epoch = step % steps_per_epoch == 0 or step == total
        if end_of_epoch and val:
            metrics["val_loss"] = _val_loss(engine, val, pad_id, cfg.micro_batch_size, rank, world)
        save = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end_of_epoch
        if rank == 0:
            _say(
                f"[sft] step {step}/{total} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                f"{metrics['tokens_per_s']:.0f} tok/s"
                + (f" val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
            )
        history.append(metrics)
        if save:
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag="ds", client_state={"step": step, "history": history})
                torch.save(torch.get_rng_state(), Path(d) / f"rng-rank{rank}.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
    _export(engine, cfg, config, rank, history)


def _val_loss(engine: Any, val: list[Example], pad_id: int, batch: int, rank: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    engine.eval()
    total, count = torch.zeros(1), torch.zeros(1)
    with torch.no_grad():
        for i in range(rank * batch, len(val), batch * world):
            b = _to(collate(val[i : i + batch], pad_id), engine.device)
            n = int((b["labels"] != IGNORE).sum())
            total += answer_loss(engine, b).float().cpu() * n
            count += n
    dist.all_reduce(total)
    dist.all_reduce(count)
    engine.train()
    return float(total / count.clamp(min=1))


def _export(
    engine: Any, cfg: SFTConfig, config: dict[str, Any], rank: int, history: list[dict[str, Any]]
) -> None:
    """Every rank records its weight digest (ranks must agree); rank 0 writes the HF folder: merged
    weights + tokenizer at the root, the LoRA adapter in `adapter/`, the per-step metrics beside."""
    import deepspeed
    from transformers import AutoTokenizer

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else None
    if gather:
        gather.__enter__()
    try:
        digest = training.params_digest(engine.module)
        storage.write_text(storage.join(config["run_dir"], f"rank-{rank}.sha256"), digest)
        if rank != 0:
            return
        out = Path(tempfile.mkdtemp(prefix="icdray-sft-"))
        module = engine.module
        if cfg.lora:
            module.save_pretrained(out / "adapter")
            merged = module.merge_and_unload()
        else:
            merged = module
        merged.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(config["model_path"]).save_pretrained(out)
        (out / "icdray_sft.json").write_text(
            json.dumps(
                {"sft": config["sft"], "base_model": config["model_name"], "weights_sha256": digest}, indent=2
            )
        )
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        storage.upload_dir(str(out), config["output"], replace=True)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if gather:
            gather.__exit__(None, None, None)


# ----------------------------------------------------------------------------------------- driver


@dataclass
class SFTResult:
    output: str
    steps: int
    train_examples: int
    val_examples: int
    dropped_too_long: int
    first_loss: float
    last_loss: float
    val_loss: float | None
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float = 0.0  # per worker process

    def format(self) -> str:
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        return (
            f"sft: {self.steps} steps on {self.train_examples} examples ({self.val_examples} held out, "
            f"{self.dropped_too_long} too long); loss {self.first_loss:.4f} -> {self.last_loss:.4f}{val}; "
            f"{self.tokens_per_s:.0f} tokens/s, peak {self.peak_rss_mb:.0f} MB per worker, {self.seconds:.0f}s; "
            f"model in {self.output}"
        )


def run_name_for(scfg: SFTConfig) -> str:
    """Same training config -> same Ray Train run (a re-run resumes it); a changed config starts afresh."""
    keep = {
        k: v for k, v in asdict(scfg).items() if k not in ("fail_at_step", "max_failures", "cpus_per_worker")
    }
    return f"sft-{zlib.crc32(json.dumps(keep, sort_keys=True).encode()):08x}"


def run(cfg: Config, output: str | None = None, run_name: str = "") -> SFTResult:
    """Fine-tune `cfg.sft.model` on the exemplars under `cfg.storage`. Needs Ray initialised.

    Re-running with the same config resumes the same Ray Train run from its latest checkpoint.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from transformers import AutoTokenizer

    scfg = cfg.sft
    run_name = run_name or run_name_for(scfg)
    start = time.time()
    model_path = models.resolve(scfg.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    table = layout.read_exemplars(cfg.storage)
    if scfg.limit:
        table = table.sort_by("hadm_id").slice(0, scfg.limit)
    train, val, dropped = build_examples(table, tok, scfg, cfg.inputs)
    if len(train) < scfg.micro_batch_size * scfg.grad_accum * scfg.num_workers:
        raise ValueError(
            f"only {len(train)} training examples for {scfg.num_workers} workers x "
            f"{scfg.micro_batch_size * scfg.grad_accum} sequences per step: distill more notes"
        )
    data_ref = ray.put({"train": train, "val": val, "pad_id": chat.pad_id(tok)})
    where = layout.Layout(cfg.storage)
    output = output or where.checkpoint("sft")
    if not storage.is_uri(output):
        output = os.path.abspath(output)  # Ray Train workers run in their own working directory
    ray_root = where.ray_runs
    if not storage.is_uri(ray_root):
        ray_root = os.path.abspath(ray_root)
    threads = max(1, int(scfg.cpus_per_worker))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "sft": asdict(scfg),
            "data_ref": [data_ref],
            "model_path": model_path,
            "model_name": scfg.model,
            "output": output,
            "threads_per_worker": threads,
            "run_dir": storage.join(ray_root, run_name, "_icdray"),
        },
        scaling_config=ScalingConfig(
            num_workers=scfg.num_workers,
            use_gpu=scfg.use_gpu,
            resources_per_worker={"CPU": scfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_root,
            failure_config=FailureConfig(max_failures=scfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # not a "Reporting training result" per step
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    history = read_metrics(output)
    losses = [m["loss"] for m in history]
    vals = [m["val_loss"] for m in history if "val_loss" in m]
    speeds = [m["tokens_per_s"] for m in history]
    return SFTResult(
        output,
        history[-1]["step"] if history else 0,
        len(train),
        len(val),
        dropped,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        vals[-1] if vals else None,
        time.time() - start,
        sum(speeds) / len(speeds) if speeds else 0.0,
        max((m.get("peak_rss_mb", 0.0) for m in history), default=0.0),
    )


def read_metrics(output: str) -> list[dict[str, Any]]:
    """The per-step metrics an SFT run exported next to its weights."""
    fs, path = storage.resolve(storage.join(output, "metrics.jsonl"))
    with fs.open_input_stream(path, compression=None) as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
