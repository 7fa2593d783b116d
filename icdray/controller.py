"""GRPO stage: one controller loop driving rollout, reward and learner actors.

    every step:  sample prompts -> generate (RolloutWorker x R: G answers per note)
                 -> score (RewardWorker x S) -> advantages (grpo.py; zero-variance groups skipped)
                 -> update (Learner x W, DeepSpeed) -> sync weights (learner -> object store -> rollout)
                 -> checkpoint every N steps -> validate (greedy sample-F1 on val) every M steps
    one JSON line per step in checkpoints/grpo/metrics.jsonl; the final merged model in checkpoints/grpo/

Resume: a checkpoint is `checkpoints/grpo/_state/step-N/` (every learner rank's DeepSpeed shards and
RNG state) made valid by `state.json`, written last. A re-run of the same command finds the newest
committed step, reloads the learners, pushes their weights to fresh rollout workers and continues at
step N+1. The prompts of a step and its sampling seeds are functions of (seed, step), so the resumed
run sees the same data in the same order. Metrics lines of steps after N (from the killed run) are
dropped on resume.

A rollout worker that dies mid-step (node lost, OOM) is replaced: a new actor gets the current
weights and its prompts are sent again with the same seeds; the step completes.
Left out: asynchronous (off-policy) rollouts overlapping the update, multi-turn rollouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from icdray import grpo, metrics, models, prepare, prompts, sft, storage
from icdray.config import Config, GRPOConfig
from icdray.learner import Experience, Learner
from icdray.reward import RewardWorker
from icdray.rollout import RolloutWorker, Sample, SamplingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Note:
    hadm_id: int
    note: str
    codes: list[str]
    prompt_ids: list[int]


def load_notes(cfg: Config, split: str, tok: Any, limit: int) -> list[Note]:
    table = prepare.read_split(cfg.storage, split, ["hadm_id", "note", "medications", "codes"])
    table = table.sort_by("hadm_id")
    if limit:
        table = table.slice(0, limit)
    return [
        Note(
            r["hadm_id"],
            r["note"],
            r["codes"],
            sft.encode_prompt(tok, r["note"], r["medications"] or [], cfg.grpo.max_prompt_tokens),
        )
        for r in table.to_pylist()
    ]


def step_prompts(n_notes: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the notes of `step` (1-based): epochs of seeded permutations, a pure function of the
    step, so a resumed run continues with exactly the data the killed run would have seen."""
    out = []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, n_notes)
        order = list(range(n_notes))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(order[pos])
    return out


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.time() - t


@dataclass
class GRPOResult:
    output: str
    steps: int
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        h = self.history
        if not h:
            return f"grpo: nothing to do, {self.steps} steps already done; model in {self.output}"
        first, last = h[0], h[-1]
        vals = [m["val_sample_f1"] for m in h if "val_sample_f1" in m]
        return (
            f"grpo: steps {first['step']}-{last['step']}"
            + (f" (resumed after step {self.resumed_from})" if self.resumed_from else "")
            + f"; reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}"
            + (f"; val sample-F1 {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else "")
            + f"; {sum(m['step_s'] for m in h) / len(h):.1f}s/step, {self.seconds:.0f}s; model in {self.output}"
        )


class Controller:
    def __init__(self, cfg: Config, model_path: str) -> None:
        import ray

        self.cfg, self.g, self.model_path = cfg, cfg.grpo, model_path
        g = self.g
        self.learner_cls = ray.remote(Learner)
        self.rollout_cls = ray.remote(RolloutWorker)
        self.rollout_settings = {
            "kv_cache_gb": g.vllm_kv_cache_gb,
            "threads_bind": f"0-{(os.cpu_count() or 1) - 1}"
            if g.vllm_threads_bind == "all"
            else g.vllm_threads_bind,
            "use_gpu": g.use_gpu,
            "dtype": g.dtype,
            "max_model_len": g.max_model_len,
            "seed": g.seed,
            "threads": max(1, int(g.rollout_cpus)),
        }
        # rank 0's rendezvous address is picked on a node, and rank 0 is then placed on that node
        node, master = ray.get(ray.remote(_free_address).options(num_cpus=0).remote())
        self.learners = [
            self._learner_opts(r, node).remote(g, model_path, r, g.learner_workers, master)
            for r in range(g.learner_workers)
        ]
        self.rollout = [self._new_rollout(i) for i in range(g.rollout_workers)]
        rw = ray.remote(RewardWorker).options(num_cpus=g.reward_cpus)
        weights = {k: v for k, v in g.reward.__dict__.items() if k != "max_chars"}
        self.rewards = [rw.remote(weights, g.reward.max_chars) for _ in range(g.reward_workers)]
        self.weights_ref: Any = None  # current policy weights in the object store (None = the model on disk)
        self.version = 0
        self.restarts = 0
        ray.get([w.stats.remote() for w in self.rollout] + [r.score.remote([], [], []) for r in self.rewards])
        ray.get([learner.__ray_ready__.remote() for learner in self.learners])

    def _learner_opts(self, rank: int, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        g = self.g
        where = NodeAffinitySchedulingStrategy(node, soft=False) if rank == 0 else "DEFAULT"
        return self.learner_cls.options(
            num_cpus=g.learner_cpus, num_gpus=1 if g.use_gpu else 0, scheduling_strategy=where
        )

    def _new_rollout(self, i: int) -> Any:
        g = self.g
        return self.rollout_cls.options(
            num_cpus=g.rollout_cpus, num_gpus=g.rollout_gpus, scheduling_strategy="SPREAD"
        ).remote(self.model_path, g.rollout_backend, self.rollout_settings)

    # ------------------------------------------------------------------------------------ phases

    def generate(
        self, prompt_ids: list[list[int]], spec: SamplingSpec, kill_one: bool = False
    ) -> list[list[Sample]]:
        """Split the prompts over the rollout workers; a worker that dies is replaced and its share re-sent."""
        import ray

        n = len(self.rollout)
        bounds = [round(i * len(prompt_ids) / n) for i in range(n + 1)]
        shards = {i: (bounds[i], bounds[i + 1]) for i in range(n) if bounds[i + 1] > bounds[i]}

        def submit(i: int) -> Any:
            lo, hi = shards[i]
            return self.rollout[i].generate.remote(prompt_ids[lo:hi], replace(spec, seed=spec.seed + lo))

        refs = {i: submit(i) for i in shards}
        if kill_one:  # fault drill: a rollout worker dies while its generation is in flight
            ray.kill(self.rollout[0])
        out: dict[int, list[list[Sample]]] = {}
        for i in shards:
            for attempt in range(3):
                try:
                    out[i] = ray.get(refs[i])
                    break
                except ray.exceptions.RayActorError as e:
                    if attempt == 2:
                        raise
                    log.warning(
                        "rollout worker %d died (%s); restarting it and re-sending %d prompts",
                        i,
                        type(e).__name__,
                        shards[i][1] - shards[i][0],
                    )
                    print(
                        f"[grpo] rollout worker {i} died mid-step; restarting it and re-sending its prompts",
                        flush=True,
                    )
                    self.restarts += 1
                    self.rollout[i] = self._new_rollout(i)
                    if self.weights_ref is not None:
                        ray.get(self.rollout[i].update_weights.remote(self.weights_ref, self.version))
                    refs[i] = submit(i)
        return [group for i in sorted(out) for group in out[i]]

    def score(
        self, texts: list[str], gold: list[list[str]], notes: list[str]
    ) -> tuple[list[float], dict[str, list[float]]]:
        import ray

        n = len(self.rewards)
        bounds = [round(i * len(texts) / n) for i in range(n + 1)]
        parts = ray.get(
            [
                r.score.remote(
                    texts[bounds[i] : bounds[i + 1]],
                    gold[bounds[i] : bounds[i + 1]],
                    notes[bounds[i] : bounds[i + 1]],
                )
                for i, r in enumerate(self.rewards)
            ]
        )
        total: list[float] = []
        comps: dict[str, list[float]] = defaultdict(list)
        for t, c in parts:
            total += t
            for k, v in c.items():
                comps[k] += v
        return total, dict(comps)

    def update(self, rows: list[Experience]) -> dict[str, float]:
        import ray

        w = len(self.learners)
        mine = [rows[r::w] for r in range(w)]
        n_micro = max(1, max(math.ceil(len(m) / self.g.micro_batch_size) for m in mine))
        tokens = sum(len(r.completion_ids) for r in rows)
        outs = ray.get(
            [
                lr.update.remote(m, n_micro, tokens, len(rows))
                for lr, m in zip(self.learners, mine, strict=True)
            ]
        )
        merged = {
            k: sum(o[k] for o in outs) / (1 if k in ("loss", "tokens") else w)
            for k in outs[0]
            if k != "seconds"
        }
        merged["seconds"] = max(o["seconds"] for o in outs)
        return merged

    def sync(self, version: int) -> float:
        import ray

        t = time.time()
        refs = [lr.export_weights.remote() for lr in self.learners]
        self.weights_ref = refs[0]  # rank 0 holds the merged weights
        ray.get(refs[1:])
        ray.get([w.update_weights.remote(self.weights_ref, version) for w in self.rollout])
        self.version = version
        return time.time() - t

    def validate(self, notes: list[Note]) -> dict[str, float]:
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=self.g.val_max_new_tokens, seed=0)
        groups = self.generate([n.prompt_ids for n in notes], spec)
        answers = [prompts.parse_answer(g[0].text) for g in groups]
        s = metrics.score([a.codes for a in answers], [n.codes for n in notes])
        return {
            "val_sample_f1": s["sample_f1"],
            "val_micro_f1": s["micro_f1"],
            "val_format_ok": sum(a.ok for a in answers) / max(1, len(answers)),
        }

    def checkpoint(self, step: int, state_root: Path) -> None:
        import ray

        folder = state_root / f"step-{step:06d}"
        shutil.rmtree(folder, ignore_errors=True)
        ray.get([lr.save.remote(str(folder), {"step": step}) for lr in self.learners])
        (folder / "state.json").write_text(json.dumps({"step": step, "time": time.time()}))  # commit marker
        for old in sorted(state_root.glob("step-*"))[:-2]:  # keep the newest two
            shutil.rmtree(old, ignore_errors=True)

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([w.stats.remote() for w in self.rollout])


def _free_address() -> tuple[str, str]:
    """(node id, host:port) of a free port on the node this task runs on."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.get_runtime_context().get_node_id(), f"{ray.util.get_node_ip_address()}:{port}"


def latest_checkpoint(state_root: Path) -> tuple[int, Path | None]:
    done = sorted(p.parent for p in state_root.glob("step-*/state.json"))
    return (int(done[-1].name.split("-")[1]), done[-1]) if done else (0, None)


def default_model(cfg: Config) -> str:
    return cfg.grpo.model or storage.join(cfg.storage, "checkpoints", "sft")


def run(cfg: Config, output: str | None = None) -> GRPOResult:
    """Train with GRPO from `cfg.grpo.model` (default: the SFT checkpoint). Needs Ray initialised."""
    import ray
    import torch
    from transformers import AutoTokenizer

    g = cfg.grpo
    start_time = time.time()
    output = output or storage.join(cfg.storage, "checkpoints", "grpo")
    if storage.is_uri(output):
        raise ValueError(
            f"grpo checkpoints go to a filesystem path every learner can reach (a local folder or an NFS/EFS "
            f"mount), not {output}: set --data to such a path"
        )
    out = Path(output).resolve()
    state_root = out / "_state"
    state_root.mkdir(parents=True, exist_ok=True)
    model_path = models.resolve(default_model(cfg))
    tok = AutoTokenizer.from_pretrained(model_path)
    train = load_notes(cfg, "train", tok, g.limit)
    val = load_notes(cfg, "val", tok, g.val_notes) if g.val_every else []
    if len(train) < g.prompts_per_step:
        raise ValueError(
            f"{len(train)} training notes for {g.prompts_per_step} prompts per step: prepare more data"
        )
    print(
        f"[grpo] {model_path}: {g.steps} steps x {g.prompts_per_step} notes x {g.group_size} answers; "
        f"{g.rollout_workers} {g.rollout_backend} rollout, {g.reward_workers} reward, {g.learner_workers} learner worker(s)",
        flush=True,
    )
    t0 = time.time()
    ctl = Controller(cfg, model_path)
    nodes = {st["node_id"] for st in ctl.stats()}
    print(f"[grpo] actors ready in {time.time() - t0:.1f}s; rollout nodes: {len(nodes)}", flush=True)

    resumed, folder = latest_checkpoint(state_root)
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if folder is not None:
        ray.get([lr.load.remote(str(folder)) for lr in ctl.learners])
        ctl.sync(resumed)
        kept = (
            [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            if metrics_path.exists()
            else []
        )
        kept = [m for m in kept if m["step"] <= resumed]
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        print(
            f"[grpo] resumed from the checkpoint of step {resumed}; continuing at step {resumed + 1}",
            flush=True,
        )
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run

    for step in range(resumed + 1, g.steps + 1):
        timer = Timer()
        with timer.phase("sample"):
            batch = [train[i] for i in step_prompts(len(train), g.prompts_per_step, step, g.seed)]
        with timer.phase("generate"):
            spec = SamplingSpec(
                g.group_size,
                g.temperature,
                g.top_p,
                g.max_new_tokens,
                seed=g.seed * 1_000_003 + step * 10_007,
            )
            groups = ctl.generate(
                [n.prompt_ids for n in batch], spec, kill_one=step == g.kill_rollout_at_step
            )
        samples = [s for grp in groups for s in grp]  # prompt-major, as grpo.py expects
        with timer.phase("score"):
            texts = [s.text for s in samples]
            gold = [n.codes for n in batch for _ in range(g.group_size)]
            note_texts = [n.note for n in batch for _ in range(g.group_size)]
            total, comps = ctl.score(texts, gold, note_texts)
        with timer.phase("advantages"):
            rewards = torch.tensor(total, dtype=torch.float32)
            adv = grpo.group_advantages(rewards, g.group_size, scale=g.scale_advantages)
            flat = grpo.zero_variance_groups(rewards, g.group_size)
            keep = [i for i in range(len(samples)) if not (g.skip_zero_variance and flat[i // g.group_size])]
            rows = [
                Experience(
                    batch[i // g.group_size].prompt_ids,
                    samples[i].token_ids,
                    samples[i].logprobs,
                    float(adv[i]),
                )
                for i in keep
                if samples[i].token_ids
            ]
        upd: dict[str, float] = {}
        if rows:
            with timer.phase("update"):
                upd = ctl.update(rows)
            with timer.phase("sync"):
                ctl.sync(step)
        if g.fail_at_step and step == g.fail_at_step:
            print(f"[grpo] fault drill: the controller dies after the update of step {step}", flush=True)
            os._exit(17)
        if step % max(1, g.checkpoint_every) == 0 or step == g.steps:
            with timer.phase("checkpoint"):
                ctl.checkpoint(step, state_root)
        m: dict[str, Any] = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            **{f"reward_{k}": sum(v) / len(v) for k, v in comps.items()},
            "groups_skipped": int(flat.sum()) if g.skip_zero_variance else 0,
            "groups": len(batch),
            "completion_tokens": sum(len(s.token_ids) for s in samples),
            "truncated_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        }
        m.update({k: v for k, v in upd.items() if k not in ("seconds",)})
        if g.val_every and (step % g.val_every == 0 or step == g.steps):
            with timer.phase("validate"):
                m.update(ctl.validate(val))
        m["rollout_restarts"] = ctl.restarts
        m["phase_s"] = {k: round(v, 3) for k, v in timer.phases.items()}
        m["step_s"] = round(sum(timer.phases.values()), 3)
        m["generate_tokens_per_s"] = m["completion_tokens"] / max(1e-6, timer.phases["generate"])
        if upd:
            m["update_tokens_per_s"] = upd["tokens"] / max(1e-6, timer.phases["update"])
        history.append(m)
        with metrics_path.open("a") as f:
            f.write(json.dumps(m) + "\n")
        print(_line(m, g), flush=True)

    if history or not (out / "config.json").exists():
        ray.get([lr.save_model.remote(str(out), model_path) for lr in ctl.learners])
        (out / "icdray_grpo.json").write_text(
            json.dumps({"grpo": asdict(g), "base_model": model_path, "steps": g.steps}, indent=2)
        )
    for a in [*ctl.learners, *ctl.rollout, *ctl.rewards]:
        ray.kill(a)
    return GRPOResult(str(out), g.steps, resumed, history, time.time() - start_time)


def _line(m: dict[str, Any], g: GRPOConfig) -> str:
    ph = " ".join(f"{k} {v:.1f}s" for k, v in m["phase_s"].items())
    extra = f" val_f1 {m['val_sample_f1']:.3f}" if "val_sample_f1" in m else ""
    upd = (
        f" loss {m['loss']:+.4f} clip {m['clip_fraction']:.2f} kl {m['kl']:.4f}"
        if "loss" in m
        else " (no update: every group flat)"
    )
    return (
        f"[grpo] step {m['step']}/{g.steps} reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} "
        f"f1 {m.get('reward_code_f1', 0.0):.3f} skipped {m['groups_skipped']}/{m['groups']}{upd}{extra} | "
        f"{m['generate_tokens_per_s']:.0f} gen tok/s | {ph}"
    )


def read_metrics(output: str) -> list[dict[str, Any]]:
    path = Path(output) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
