"""GRPO stage: one controller loop driving rollout, reward and learner actors.

    every step (`train_step`, named and timed phases):
        sample    notes of the step (a pure function of seed and step)
        generate  RolloutWorker x R: G answers per note (constrained by the run's grammar by default)
        score     RewardWorker x S: weighted rewards (grpo/rewards.py)
        advantages group-relative (algo.py); flat groups dropped; while too few groups carry signal,
                  more notes are drawn within the step (`extra_draws`, DAPO's dynamic sampling)
        update    Learner x W (DeepSpeed): shared-prefix packing, the sampler's token mask, clipped loss
        sync      learner rank 0 -> object store -> every rollout worker (grpo.weight_sync=object_store),
                  or one broadcast over gloo/NCCL (broadcast: grpo/weights.py); colocated placement
                  puts the engines to sleep for the update and wakes them for the sync
        checkpoint every N steps; validate (greedy sample-F1 on val) every M steps
    one JSON line per step in checkpoints/grpo/metrics.jsonl; the final merged model in checkpoints/grpo/

Resume: a checkpoint is `checkpoints/grpo/_state/step-N/` (every learner rank's DeepSpeed shards and
RNG state) made valid by `state.json`, written last; the storage root may be a local folder, a shared
mount, or object storage (s3://, gs://: ranks save locally and upload). A re-run of the same command finds the newest
committed step, reloads the learners, pushes their weights to fresh rollout workers and continues at
step N+1. The prompts of a step and its sampling seeds are functions of (seed, step), so the resumed
run sees the same data in the same order. Metrics lines of steps after N are dropped on resume.

A rollout worker that dies mid-step (node lost, OOM) is replaced: a new actor gets the current
weights and its prompts are sent again with the same seeds; the step completes. Tests inject faults
through `Hooks` (see `icdray/testing/drills.py`); the loop itself has no fault switches.
Left out: asynchronous (off-policy) rollouts overlapping the update, multi-turn rollouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from icdray import chat, grammar, layout, metrics, models, prompts, storage
from icdray.config import Config, GRPOConfig
from icdray.engine import Sample, SamplingSpec, cpu_bind
from icdray.grpo import algo, credit
from icdray.grpo.learner import Experience, Learner, micro_batches
from icdray.grpo.rewards import RewardWorker
from icdray.grpo.rollout import RolloutWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Note:
    hadm_id: int
    note: str
    codes: list[str]
    prompt_ids: list[int]


def load_notes(cfg: Config, split: str, tok: Any, limit: int) -> list[Note]:
    table = layout.read_split(cfg.storage, split, ["hadm_id", "note", "medications", "codes"])
    if limit:
        table = table.slice(0, limit)
    inp = cfg.inputs
    return [
        Note(
            r["hadm_id"],
            r["note"],
            r["codes"],
            chat.encode_prompt(tok, r["note"], r["medications"], inp.max_prompt_tokens, inp.thinking),
        )
        for r in table.to_pylist()
    ]


def step_prompts(n_notes: int, per_step: int, step: int, seed: int, draw: int = 0) -> list[int]:
    """Indices of the notes of `step` (1-based), draw `draw` of it: epochs of seeded permutations, a pure
    function of (seed, step, draw), so a resumed run continues with exactly the data the killed run saw."""
    out = []
    stream = seed * 100_003 + draw * 7_919
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, n_notes)
        order = list(range(n_notes))
        random.Random(stream + epoch).shuffle(order)
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


class Hooks:
    """Points where tests inject faults; the production loop uses these no-ops."""

    def generation_in_flight(self, step: int, ctl: Controller) -> None:
        """Called after a step's prompts were sent to the rollout workers, before their answers are read."""

    def after_update(self, step: int, ctl: Controller, result: dict[str, float]) -> None:
        """Called after a step's update and weight sync, before its checkpoint; `result` holds the step's
        mean reward and the update's figures (loss, ...)."""


@dataclass
class GRPOResult:
    output: str
    steps: int
    resumed_from: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    kept_step: int | None = None  # the step whose weights were exported, when the validation gate chose

    def format(self) -> str:
        h = self.history
        if not h:
            return f"grpo: nothing to do, {self.steps} steps already done; model in {self.output}"
        first, last = h[0], h[-1]
        vals = [m["val_sample_f1"] for m in h if "val_sample_f1" in m]
        updates = sum("loss" in m for m in h)
        return (
            f"grpo: steps {first['step']}-{last['step']}"
            + (f" (resumed after step {self.resumed_from})" if self.resumed_from else "")
            + f", {updates} with an update; reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}"
            + (f"; val sample-F1 {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else "")
            + f"; {sum(m['step_s'] for m in h) / len(h):.1f}s/step, {self.seconds:.0f}s"
            + (f"; kept step {self.kept_step}" if self.kept_step is not None else "")
            + f"; model in {self.output}"
        )


def answer_constraint(cfg: Config) -> grammar.AnswerConstraint | None:
    """The rollouts' grammar: the run's label space (prepare.top_k_codes) or every billable code."""
    if not cfg.grpo.engine.constrained:
        return None
    if cfg.grpo.engine.backend != "vllm":
        raise ValueError(
            "constrained rollouts need grpo.engine.backend=vllm (or grpo.engine.constrained=false)"
        )
    return grammar.constraint(layout.label_space(cfg.storage), cfg.answer)


class Controller:
    """Handles to the actor groups, and one method per phase that fans a call out to a group."""

    def __init__(self, cfg: Config, model_path: str) -> None:
        import ray
        from transformers import AutoTokenizer

        self.cfg, self.g, self.model_path = cfg, cfg.grpo, model_path
        g = self.g
        if g.baseline not in ("group", "greedy"):
            raise ValueError(f"grpo.baseline must be group or greedy, got {g.baseline!r}")
        if g.placement not in ("disaggregated", "colocated"):
            raise ValueError(f"grpo.placement must be disaggregated or colocated, got {g.placement!r}")
        if g.weight_sync not in ("object_store", "broadcast"):
            raise ValueError(f"grpo.weight_sync must be object_store or broadcast, got {g.weight_sync!r}")
        self.constraint = answer_constraint(cfg)
        self.max_tokens = self.constraint.max_tokens if self.constraint else g.max_new_tokens
        self.engine_cfg = replace(
            g.engine,
            threads=g.engine.threads or max(1, int(g.rollout_cpus)),
            threads_bind=cpu_bind(g.engine.threads_bind),
            max_model_len=max(g.engine.max_model_len, cfg.inputs.max_prompt_tokens + self.max_tokens + 8),
            sleep_mode=g.engine.sleep_mode or (g.placement == "colocated" and g.engine.device == "cuda"),
        )
        self.learner_cls = ray.remote(Learner)
        self.rollout_cls = ray.remote(RolloutWorker)
        # rank 0's rendezvous address is picked on a node, and rank 0 is then placed on that node
        node, master = ray.get(ray.remote(_free_address).options(num_cpus=0).remote())
        self.learners = [
            self._learner_opts(r, node).remote(g, model_path, r, g.learner_workers, master, self.constraint)
            for r in range(g.learner_workers)
        ]
        self.rollout = [self._new_rollout() for _ in range(g.rollout_workers)]
        rw = ray.remote(RewardWorker).options(num_cpus=g.reward_cpus)
        self.rewards = [rw.remote(g.reward) for _ in range(g.reward_workers)]
        self.weights_ref: Any = None  # current policy weights in the object store (None = the model on disk)
        self.weight_meta: list[Any] | None = None  # broadcast sync: the group's parameter list once formed
        self.node = node
        self.version = 0
        self.restarts = 0
        self.tokenizer = AutoTokenizer.from_pretrained(model_path) if g.item_credit else None
        ray.get([w.stats.remote() for w in self.rollout] + [r.score.remote([], [], []) for r in self.rewards])
        ray.get([learner.__ray_ready__.remote() for learner in self.learners])

    def _learner_opts(self, rank: int, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        g = self.g
        where = NodeAffinitySchedulingStrategy(node, soft=False) if rank == 0 else "DEFAULT"
        return self.learner_cls.options(
            num_cpus=g.learner_cpus, num_gpus=g.learner_gpus if g.use_gpu else 0, scheduling_strategy=where
        )

    def _new_rollout(self) -> Any:
        g = self.g
        return self.rollout_cls.options(
            num_cpus=g.rollout_cpus, num_gpus=g.rollout_gpus, scheduling_strategy="SPREAD"
        ).remote(self.model_path, self.engine_cfg, self.constraint)

    # ------------------------------------------------------------------------------------ phases

    def generate(
        self, prompt_ids: list[list[int]], spec: SamplingSpec, hooks: Hooks | None = None, step: int = 0
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
        if hooks is not None:
            hooks.generation_in_flight(step, self)
        out: dict[int, list[list[Sample]]] = {}
        for i in shards:
            for attempt in range(3):
                try:
                    out[i] = ray.get(refs[i])
                    break
                except ray.exceptions.RayActorError as e:
                    if attempt == 2:
                        raise
                    log.warning("rollout worker %d died (%s); restarting it", i, type(e).__name__)
                    print(
                        f"[grpo] rollout worker {i} died mid-step; restarting it and re-sending its prompts",
                        flush=True,
                    )
                    self.restarts += 1
                    self.rollout[i] = self._new_rollout()
                    if self.version and self.weights_ref is None:  # broadcast sync: no copy in the store
                        self.weights_ref = self.learners[0].export_weights.remote()
                        ray.get([lr.export_weights.remote() for lr in self.learners[1:]])
                    if self.weights_ref is not None:
                        ray.get(self.rollout[i].update_weights.remote(self.weights_ref, self.version))
                    self.weight_meta = (
                        None  # the broadcast group lost a member: formed again at the next sync
                    )
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
                r.score.remote(texts[lo:hi], gold[lo:hi], notes[lo:hi])
                for r, lo, hi in zip(self.rewards, bounds, bounds[1:], strict=False)
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
        """One learner step: micro-batches (packed groups) dealt to the ranks, metrics merged."""
        import ray

        w = len(self.learners)
        chunks = [[rows[i] for i in idx] for idx in micro_batches(rows, self.g)]
        mine = [chunks[r::w] for r in range(w)]
        n_micro = max(1, max(len(m) for m in mine))
        tokens = sum(len(r.completion_ids) for r in rows)
        outs = ray.get(
            [
                lr.update.remote(m, n_micro, tokens, len(rows))
                for lr, m in zip(self.learners, mine, strict=True)
            ]
        )
        summed = ("loss", "tokens")
        merged = {k: sum(o[k] for o in outs) / (1 if k in summed else w) for k in outs[0] if k != "seconds"}
        merged["seconds"] = max(o["seconds"] for o in outs)
        return merged

    def call_rollouts(self, method: str) -> None:
        import ray

        ray.get([getattr(w, method).remote() for w in self.rollout])

    def _open_weight_channel(self) -> None:
        """Form the broadcast group: learner rank 0 (its TCPStore on rank 0's node) and every rollout worker."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        g = self.g
        backend = g.weight_backend if g.weight_backend != "auto" else "nccl" if g.use_gpu else "gloo"
        where = NodeAffinitySchedulingStrategy(self.node, soft=False)
        _, address = ray.get(
            ray.remote(_free_address).options(num_cpus=0, scheduling_strategy=where).remote()
        )
        world = 1 + len(self.rollout)
        metas = [
            lr.open_weight_channel.remote(address, world, backend, g.weight_bucket_mb) for lr in self.learners
        ]
        joined = [
            w.open_weight_channel.remote(address, r + 1, world, backend, g.weight_bucket_mb)
            for r, w in enumerate(self.rollout)
        ]
        self.weight_meta = ray.get(metas)[0]
        ray.get(joined)

    def sync(self, version: int) -> float:
        import ray

        t = time.time()
        if self.g.weight_sync == "broadcast":
            if self.weight_meta is None:
                self._open_weight_channel()
            self.weights_ref = None
            sent = [lr.broadcast_weights.remote() for lr in self.learners]
            ray.get([w.receive_weights.remote(self.weight_meta, version) for w in self.rollout] + sent)
            self.version = version
            return time.time() - t
        refs = [lr.export_weights.remote() for lr in self.learners]
        self.weights_ref = refs[0]  # rank 0 holds the merged weights
        ray.get(refs[1:])
        ray.get([w.update_weights.remote(self.weights_ref, version) for w in self.rollout])
        self.version = version
        return time.time() - t

    def validate(self, notes: list[Note]) -> dict[str, float]:
        spec = SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens, seed=0)
        groups = self.generate([n.prompt_ids for n in notes], spec)
        answers = [prompts.parse_answer(g[0].text) for g in groups]
        s = metrics.score([a.codes for a in answers], [n.codes for n in notes])
        return {
            "val_sample_f1": s["sample_f1"],
            "val_sample_precision": s["sample_precision"],
            "val_sample_recall": s["sample_recall"],
            "val_codes": s["mean_predicted"],  # codes per answer: how GRPO moves precision against recall
            "val_micro_f1": s["micro_f1"],
            "val_format_ok": sum(a.ok for a in answers) / max(1, len(answers)),
        }

    def checkpoint(self, step: int, state_root: str) -> None:
        """Every rank's state under `state_root/step-N/`, committed by `state.json` once all ranks saved."""
        import ray

        folder = storage.join(state_root, f"step-{step:06d}")
        storage.delete_dir(folder)
        ray.get([lr.save.remote(folder, {"step": step}) for lr in self.learners])
        storage.write_json(storage.join(folder, "state.json"), {"step": step, "time": time.time()})
        for old in [n for n in storage.listdir(state_root) if n.startswith("step-")][
            :-2
        ]:  # keep the newest two
            storage.delete_dir(storage.join(state_root, old))

    def stats(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([w.stats.remote() for w in self.rollout])

    def shutdown(self) -> None:
        import ray

        for a in [*self.learners, *self.rollout, *self.rewards]:
            ray.kill(a)


def _free_address() -> tuple[str, str]:
    """(node id, host:port) of a free port on the node this task runs on."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.get_runtime_context().get_node_id(), f"{ray.util.get_node_ip_address()}:{port}"


def latest_checkpoint(state_root: str) -> tuple[int, str | None]:
    """The newest committed step (its state.json exists) and its folder, or (0, None)."""
    for name in reversed([n for n in storage.listdir(state_root) if n.startswith("step-")]):
        folder = storage.join(state_root, name)
        if storage.exists(storage.join(folder, "state.json")):
            return int(name.split("-")[1]), folder
    return 0, None


def default_model(cfg: Config) -> str:
    return cfg.grpo.model or layout.Layout(cfg.storage).checkpoint("sft")


@dataclass
class Rollouts:
    """What the advantages phase hands to the update: experience rows plus what the step line reports."""

    rows: list[Experience]
    rewards: list[float]  # every sampled answer's total reward, all draws
    components: dict[str, list[float]]
    samples: list[Sample]
    groups_drawn: int
    groups_kept: int
    groups_flat: int = 0
    baseline: list[float] = field(default_factory=list)  # the greedy answers' rewards (grpo.baseline=greedy)


def collect(ctl: Controller, train: list[Note], step: int, timer: Timer, hooks: Hooks) -> Rollouts:
    """Generate, score and keep the groups that carry signal, drawing more notes while too few do."""
    import torch

    g = ctl.g
    out = Rollouts([], [], defaultdict(list), [], 0, 0)
    for draw in range(1 + g.extra_draws):
        with timer.phase("sample"):
            batch = [train[i] for i in step_prompts(len(train), g.prompts_per_step, step, g.seed, draw)]
        with timer.phase("generate"):
            seed = g.seed * 1_000_003 + step * 10_007 + draw * 101
            spec = SamplingSpec(
                g.group_size, g.temperature, g.top_p, ctl.max_tokens, seed=seed, min_tokens=g.min_new_tokens
            )
            groups = ctl.generate([n.prompt_ids for n in batch], spec, hooks if draw == 0 else None, step)
            if g.baseline == "greedy":
                greedy = replace(spec, n=1, temperature=0.0, top_p=1.0)
                greedy_texts = [grp[0].text for grp in ctl.generate([n.prompt_ids for n in batch], greedy)]
        samples = [s for grp in groups for s in grp]  # prompt-major, as algo.py expects
        with timer.phase("score"):
            gold = [n.codes for n in batch for _ in range(g.group_size)]
            note_texts = [n.note for n in batch for _ in range(g.group_size)]
            total, comps = ctl.score([s.text for s in samples], gold, note_texts)
            baseline = None
            if g.baseline == "greedy":
                got, _ = ctl.score(greedy_texts, [n.codes for n in batch], [n.note for n in batch])
                baseline = torch.tensor(got, dtype=torch.float32)
                out.baseline += got
        with timer.phase("advantages"):
            rewards = torch.tensor(total, dtype=torch.float32)
            adv = algo.group_advantages(rewards, g.group_size, scale=g.scale_advantages, baseline=baseline)
            flat = algo.zero_variance_groups(rewards, g.group_size, baseline)
            for p, note in enumerate(batch):
                members = range(p * g.group_size, (p + 1) * g.group_size)
                per_token: list[list[float] | None] = [None] * g.group_size
                if g.item_credit:
                    per_token = list(
                        credit.group_token_advantages(
                            ctl.tokenizer,
                            [samples[i].token_ids for i in members],
                            note.codes,
                            [g.answer_credit * float(adv[i]) for i in members],
                            g.item_credit,
                        )
                    )
                    # answers that scored the same can still differ in their items' codes
                    flat[p] = bool(flat[p]) and not any(any(a) for a in per_token if a)
                out.groups_flat += int(flat[p])
                if (g.skip_zero_variance and flat[p]) or out.groups_kept >= g.prompts_per_step:
                    continue
                out.groups_kept += 1
                for i, tok_adv in zip(members, per_token, strict=True):
                    if samples[i].token_ids:
                        out.rows.append(
                            Experience(
                                note.prompt_ids,
                                samples[i].token_ids,
                                samples[i].logprobs,
                                float(adv[i]),
                                tok_adv,
                            )
                        )
        out.groups_drawn += len(batch)
        out.rewards += total
        out.samples += samples
        for k, v in comps.items():
            out.components[k] += v
        if out.groups_kept >= g.prompts_per_step:
            break
    return out


def train_step(
    ctl: Controller, train: list[Note], val: list[Note], step: int, state_root: Path, hooks: Hooks
) -> dict[str, Any]:
    """One GRPO step as named, timed phases; returns the step's metrics line."""
    g, timer = ctl.g, Timer()
    got = collect(ctl, train, step, timer, hooks)
    upd: dict[str, float] = {}
    if got.rows:
        colocated = g.placement == "colocated"
        if colocated:
            with timer.phase("sleep"):
                ctl.call_rollouts("sleep")
        with timer.phase("update"):
            upd = ctl.update(got.rows)
        with timer.phase("sync"):
            if colocated:
                ctl.call_rollouts("wake")
            ctl.sync(step)
    r = got.rewards
    mean = sum(r) / len(r)
    hooks.after_update(step, ctl, {"reward_mean": mean, **upd})
    if step % max(1, g.checkpoint_every) == 0 or step == g.steps:
        with timer.phase("checkpoint"):
            ctl.checkpoint(step, state_root)
    m: dict[str, Any] = {
        "step": step,
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else 0.0,
        **{f"reward_{k}": sum(v) / len(v) for k, v in got.components.items()},
        **({"reward_greedy": sum(got.baseline) / len(got.baseline)} if got.baseline else {}),
        "groups": got.groups_drawn,
        "groups_kept": got.groups_kept,
        "groups_flat": got.groups_flat,
        "completion_tokens": sum(len(s.token_ids) for s in got.samples),
        "truncated_rate": sum(s.finish_reason == "length" for s in got.samples) / len(got.samples),
        **{k: v for k, v in upd.items() if k != "seconds"},
    }
    if g.val_every and (step % g.val_every == 0 or step == g.steps):
        with timer.phase("validate"):
            m.update(ctl.validate(val))
    m["rollout_restarts"] = ctl.restarts
    m["phase_s"] = {k: round(v, 3) for k, v in timer.phases.items()}
    m["step_s"] = round(sum(timer.phases.values()), 3)
    m["generate_tokens_per_s"] = m["completion_tokens"] / max(1e-6, timer.phases["generate"])
    if upd:
        m["update_tokens_per_s"] = upd["tokens"] / max(1e-6, timer.phases["update"])
    return m


def run(cfg: Config, output: str | None = None, hooks: Hooks | None = None) -> GRPOResult:
    """Train with GRPO from `cfg.grpo.model` (default: the SFT checkpoint). Needs Ray initialised."""
    import ray
    from transformers import AutoTokenizer

    g, hooks = cfg.grpo, hooks or Hooks()
    start_time = time.time()
    out = output or layout.Layout(cfg.storage).checkpoint("grpo")
    if not storage.is_uri(out):
        out = os.path.abspath(out)  # learners run in their own working directories
    state_root = storage.join(out, "_state")
    metrics_path = storage.join(out, "metrics.jsonl")
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
        f"{g.rollout_workers} {g.engine.backend} rollout ({'constrained' if g.engine.constrained else 'free'}), "
        f"{g.reward_workers} reward, {g.learner_workers} learner worker(s)",
        flush=True,
    )
    t0 = time.time()
    ctl = Controller(cfg, model_path)
    nodes = {st["node_id"] for st in ctl.stats()}
    print(f"[grpo] actors ready in {time.time() - t0:.1f}s; rollout nodes: {len(nodes)}", flush=True)

    resumed, folder = latest_checkpoint(state_root)
    lines: list[str] = []
    if folder is not None:
        ray.get([lr.load.remote(folder) for lr in ctl.learners])
        ctl.sync(resumed)
        if storage.exists(metrics_path):  # lines of steps after the checkpoint came from the killed run
            old = [x for x in storage.read_text(metrics_path).splitlines() if x.strip()]
            lines = [x for x in old if json.loads(x)["step"] <= resumed]
        print(
            f"[grpo] resumed from the checkpoint of step {resumed}; continuing at step {resumed + 1}",
            flush=True,
        )
    storage.write_text(metrics_path, "".join(x + "\n" for x in lines))
    gate = _Gate(out, resumed) if g.keep_best and val else None
    if gate is not None and 0 not in gate.scores:
        start = ctl.validate(val)
        gate.record(0, start["val_sample_f1"])
        print(
            f"[grpo] start model: val sample-F1 {start['val_sample_f1']:.3f} (p {start['val_sample_precision']:.2f}"
            f" r {start['val_sample_recall']:.2f}, {start['val_codes']:.1f} codes) on {len(val)} notes",
            flush=True,
        )

    history: list[dict[str, Any]] = []
    for step in range(resumed + 1, g.steps + 1):
        m = train_step(ctl, train, val, step, state_root, hooks)
        history.append(m)
        lines.append(json.dumps(m))
        storage.write_text(metrics_path, "".join(x + "\n" for x in lines))
        print(_line(m, g), flush=True)
        if gate is not None and "val_sample_f1" in m:
            gate.record(step, m["val_sample_f1"])
            if step < g.steps and gate.best == step:  # the final step's weights are exported below anyway
                ray.get([lr.save_model.remote(gate.folder(step), model_path) for lr in ctl.learners])

    kept = gate.best if gate is not None else None
    if history or not storage.exists(storage.join(out, "config.json")):
        if kept is None or kept == g.steps:
            ray.get([lr.save_model.remote(out, model_path) for lr in ctl.learners])
        else:
            source = model_path if kept == 0 else gate.folder(kept)
            ray.get([lr.copy_model.remote(out, source) for lr in ctl.learners])
            print(
                f"[grpo] kept step {kept}: val sample-F1 {gate.scores[kept]:.3f}, against "
                f"{gate.scores.get(g.steps, float('nan')):.3f} at the last step",
                flush=True,
            )
        storage.write_json(
            storage.join(out, "icdray_grpo.json"),
            {
                "grpo": asdict(g),
                "base_model": model_path,
                "steps": g.steps,
                "kept_step": g.steps if kept is None else kept,
                "val_sample_f1_by_step": gate.scores if gate is not None else {},
            },
        )
    ctl.shutdown()
    return GRPOResult(out, g.steps, resumed, history, time.time() - start_time, kept)


class _Gate:
    """`grpo.keep_best`: validation sample-F1 by step (0 = the start model) in `OUT/gate.json`, and the
    export of the best step so far under `OUT/_best/`, so a resumed run chooses from the same figures."""

    def __init__(self, out: str, resumed: int) -> None:
        self.out, self.path = out, storage.join(out, "gate.json")
        saved = storage.read_json(self.path) if resumed and storage.exists(self.path) else {}
        # figures of steps after the checkpoint came from the killed run, which this run repeats
        self.scores = {int(k): float(v) for k, v in saved.items() if int(k) <= resumed}

    @property
    def best(self) -> int:
        return algo.best_step(self.scores)

    def folder(self, step: int) -> str:
        return storage.join(self.out, "_best", f"step-{step:06d}")

    def record(self, step: int, f1: float) -> None:
        self.scores[step] = f1
        storage.write_json(self.path, {str(k): v for k, v in sorted(self.scores.items())})


def _line(m: dict[str, Any], g: GRPOConfig) -> str:
    ph = " ".join(f"{k} {v:.1f}s" for k, v in m["phase_s"].items())
    extra = (
        f" val_f1 {m['val_sample_f1']:.3f} (p {m['val_sample_precision']:.2f} r {m['val_sample_recall']:.2f},"
        f" {m['val_codes']:.1f} codes)"
        if "val_sample_f1" in m
        else ""
    )
    upd = (
        f" loss {m['loss']:+.4f} clip {m['clip_fraction']:.2f} kl {m['kl']:.4f} gap {m['sampler_logprob_gap']:.1e}"
        f" |g| {m['grad_norm']:.3f}"
        if "loss" in m
        else " (no update: every group flat)"
    )
    return (
        f"[grpo] step {m['step']}/{g.steps} reward {m['reward_mean']:.3f}±{m['reward_std']:.3f} "
        f"f1 {m.get('reward_code_f1', 0.0):.3f} groups {m['groups_kept']}/{m['groups']} kept{upd}{extra} | "
        f"{m['generate_tokens_per_s']:.0f} gen tok/s | {ph}"
    )


def read_metrics(output: str) -> list[dict[str, Any]]:
    path = storage.join(output, "metrics.jsonl")
    return (
        [json.loads(x) for x in storage.read_text(path).splitlines() if x.strip()]
        if storage.exists(path)
        else []
    )
