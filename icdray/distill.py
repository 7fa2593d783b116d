"""Distill stage: teacher exemplars for the training notes, on Ray Data.

    prompts/train --(k samples per note, minus cached)--> Ray Data map_batches(TeacherWorker actor pool)
        each worker: threads -> shared Limiter actor (RPM/TPM) -> teacher call with retries -> cache file
    cache --> best sample per note by agreement F1 with gold --> exemplars/*.parquet (kept)
                                                              exemplars/_outcomes/ (every note's outcome)

Every finished call (answer, block or final failure) is persisted at once, one small JSON file per
(note hash, prompt version, teacher, model, sample index), so a killed run restarted with the same
config asks nothing twice and loses no answer. Calls that fail for good are recorded with their
error, not dropped. A summary (notes, calls, retries, 429s, failures, kept, rejected, tokens, cost)
is printed and saved as `exemplars/_summary.json`. Notes never appear in logs.

`predict` runs the same machinery without gold codes on a held-out split and scores the teacher with
`metrics`, so the teacher is also a baseline in the results table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from icdray import grammar, layout, metrics, prompts, storage, teacher
from icdray.config import Config, TeacherConfig

log = logging.getLogger(__name__)
OUTCOME_SCHEMA = pa.schema(
    [
        ("hadm_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("status", pa.string()),
        ("best_sample", pa.int32()),
        ("agreement_f1", pa.float64()),
        ("attempts", pa.int32()),
        ("error", pa.string()),
    ]
)


def note_hash(note: str, medications: list[str] | None) -> str:
    return hashlib.sha256(f"{note}\x00{chr(10).join(medications or [])}".encode()).hexdigest()[:20]


def uses_gold(cfg: TeacherConfig) -> bool:
    """Whether the teacher sees the gold codes (the reference teacher always does: it writes from them)."""
    return cfg.show_gold or cfg.backend == "reference"


def cache_key(nhash: str, cfg: TeacherConfig, sample_index: int, bounds: grammar.Bounds) -> str:
    model = teacher.ReferenceTeacher.model if cfg.backend == "reference" else cfg.model
    variant = "gold" if uses_gold(cfg) else "plain"
    if cfg.backend == "reference":  # its answers are written within the bounds
        variant += f"-b{bounds.max_reasoning_chars}.{bounds.max_evidence_chars}.{bounds.max_codes}"
    return "-".join(
        [nhash, prompts.PROMPT_VERSION, cfg.backend, model.replace("/", "_"), variant, str(sample_index)]
    )


class ResultCache:
    """One JSON file per finished call under `<root>/_cache/`; writes are atomic (temp file + rename)."""

    def __init__(self, root: str) -> None:
        self.dir = storage.join(root, "_cache")
        self.fs, self.path = storage.resolve(self.dir)

    def put(self, record: dict[str, Any]) -> None:
        self.fs.create_dir(self.path, recursive=True)
        final = f"{self.path}/{record['key']}.json"
        tmp = f"{self.path}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp, compression=None) as f:
            f.write(json.dumps(record).encode())
        self.fs.move(tmp, final)

    def keys(self) -> set[str]:
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return set()
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return {i.base_name[:-5] for i in infos if i.base_name.endswith(".json")}

    def get_many(self, keys: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Records by key, and the keys whose file exists but cannot be read (corrupt, truncated, no access):
        those are logged and counted, and their calls made again, never silently treated as missing."""

        def read(k: str) -> tuple[str, dict[str, Any] | None, bool]:
            try:
                with self.fs.open_input_stream(f"{self.path}/{k}.json", compression=None) as f:
                    data = json.loads(f.read())
                return (
                    k,
                    data if isinstance(data, dict) and "status" in data else None,
                    not isinstance(data, dict),
                )
            except FileNotFoundError:
                return k, None, False
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                log.warning(
                    "teacher cache file %s.json cannot be read (%s): the call will be made again", k, e
                )
                return k, None, True

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(read, keys))
        return {k: v for k, v, _ in got if v is not None}, [k for k, _, bad in got if bad]


def _limiter_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class Limiter:
        """The one rate-limit schedule all teacher workers book from (an async actor: never blocks)."""

        def __init__(self, rpm: int, tpm: int, margin: float) -> None:
            self.limit = teacher.RateLimit(rpm, tpm, margin)

        async def reserve(self, tokens: int) -> float:
            return self.limit.reserve(tokens, time.time())

        async def penalize(self, seconds: float) -> None:
            self.limit.penalize(seconds, time.time())

    return Limiter


class TeacherWorker:
    """Ray Data actor: calls the teacher for a batch of (note, sample) rows with `threads` in flight."""

    def __init__(
        self, cfg: TeacherConfig, out_root: str, limiter: Any, threads: int, bounds: grammar.Bounds
    ) -> None:
        self.cfg, self.cache = cfg, ResultCache(out_root)
        self.teacher = teacher.make_teacher(cfg, bounds)
        self.limiter, self.threads = limiter, threads
        self.rng = random.Random()
        self.lock = threading.Lock()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        with ThreadPoolExecutor(self.threads) as pool:
            statuses = list(pool.map(self._one, rows))
        return pa.table({"key": [r["key"] for r in rows], "status": statuses})

    def _wait_turn(self, tokens: int) -> None:
        import ray

        if self.limiter is not None:
            delay = ray.get(self.limiter.reserve.remote(tokens))
            if delay > 0:
                time.sleep(delay)

    def _throttled(self, hint: float) -> None:
        if self.limiter is not None and hint > 0:
            self.limiter.penalize.remote(hint)

    def _one(self, row: dict[str, Any]) -> str:
        note, meds, gold = row["note"], row["medications"] or [], row["codes"]
        tokens = teacher.estimate_tokens(note) + self.cfg.max_output_tokens // 4
        with self.lock:
            rng = random.Random(self.rng.random())
        result = teacher.call_with_retries(
            lambda: self.teacher.generate(
                note, meds, gold if row["with_gold"] else None, row["sample_index"]
            ),
            self.cfg,
            before_attempt=lambda: self._wait_turn(tokens),
            on_throttle=self._throttled,
            rng=rng,
        )
        reply = result.reply
        self.cache.put(
            {
                "key": row["key"],
                "hadm_id": row["hadm_id"],
                "subject_id": row["subject_id"],
                "sample_index": row["sample_index"],
                "status": result.status,
                "text": reply.text if reply else None,
                "finish_reason": reply.finish_reason if reply else "",
                "error": result.error,
                "input_tokens": reply.input_tokens if reply else 0,
                "output_tokens": reply.output_tokens if reply else 0,
                "attempts": result.attempts,
                "retries": result.retries,
                "throttled": result.throttled,
                "latency_s": round(result.latency_s, 3),
                "teacher_backend": self.teacher.backend,
                "teacher_model": self.teacher.model,
                "prompt_version": prompts.PROMPT_VERSION,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "finished_at": time.time(),
            }
        )
        return result.status


@dataclass
class Summary:
    mode: str = "distill"
    notes: int = 0
    samples: int = 0
    cached_before: int = 0
    unreadable_cache: int = 0  # cache files that could not be read (logged; their calls were made again)
    calls: int = 0  # HTTP attempts made by this run
    retries: int = 0
    throttled_429: int = 0
    failed: int = 0
    blocked: int = 0
    kept: int = 0
    rejected: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    requests_per_minute: float = 0.0
    teacher: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        return (
            f"{self.mode}: {self.notes} notes, {self.samples} samples ({self.cached_before} from cache"
            + (
                f", {self.unreadable_cache} unreadable cache files called again"
                if self.unreadable_cache
                else ""
            )
            + "); "
            f"{self.calls} calls, {self.retries} retries, {self.throttled_429} answered 429, "
            f"{self.failed} failed, {self.blocked} blocked; kept {self.kept}, rejected {self.rejected}; "
            f"tokens {self.tokens_in:,} in / {self.tokens_out:,} out, est. ${self.cost_usd:.2f}; "
            f"{self.seconds:.1f}s, {self.requests_per_minute:.0f} requests/min"
            + (f"\n  errors: {self.errors}" if self.errors else "")
        )


def _read_notes(storage_root: str, split: str, limit: int) -> pa.Table:
    cols = ["hadm_id", "subject_id", "note", "medications", "codes"]
    table = layout.read_split(storage_root, split, cols)  # sorted by hadm_id: `limit` is deterministic
    return table.slice(0, limit) if limit else table


def _work_items(notes: pa.Table, cfg: TeacherConfig, with_gold: bool, bounds: grammar.Bounds) -> pa.Table:
    hashes = [
        note_hash(n, m)
        for n, m in zip(notes["note"].to_pylist(), notes["medications"].to_pylist(), strict=True)
    ]
    parts = []
    for k in range(cfg.samples_per_note):
        parts.append(
            notes.append_column("sample_index", pa.array([k] * notes.num_rows, pa.int32()))
            .append_column("key", pa.array([cache_key(h, cfg, k, bounds) for h in hashes]))
            .append_column("with_gold", pa.array([with_gold] * notes.num_rows))
        )
    return pa.concat_tables(parts)


def _run_calls(items: pa.Table, cfg: TeacherConfig, out_root: str, bounds: grammar.Bounds) -> None:
    """The Ray Data part: the pending (note, sample) rows through an actor pool of teacher workers."""
    import ray

    limiter = None
    if cfg.requests_per_minute or cfg.tokens_per_minute:
        limiter = _limiter_class().remote(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.rate_margin)
    threads = max(1, -(-cfg.concurrency // max(1, cfg.workers)))  # ceil: all of `concurrency` is used
    rows = threads * 4  # rows per task: threads stay busy; a task's slowest call bounds its tail
    ds = ray.data.from_arrow([items.slice(i, rows) for i in range(0, items.num_rows, rows)])
    ds = ds.map_batches(
        TeacherWorker,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=1.0 if cfg.backend == "reference" else 0.25,  # remote calls wait on the network, not the CPU
        fn_constructor_kwargs={
            "cfg": cfg,
            "out_root": out_root,
            "limiter": limiter,
            "threads": threads,
            "bounds": bounds,
        },
        runtime_env={"env_vars": _credentials(cfg)},
    )
    done = ds.materialize()
    log.info("teacher calls finished: %s", Counter(done.to_pandas()["status"]))


def _credentials(cfg: TeacherConfig) -> dict[str, str]:
    """The API key travels to the workers as an environment variable, as it came to the driver."""
    import os

    names = [cfg.api_key_env, "GOOGLE_API_KEY"] if cfg.backend == "gemini" else []
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def _summarise(records: dict[str, dict[str, Any]], run_keys: set[str], cached: set[str]) -> Summary:
    s = Summary(samples=len(records), cached_before=len(cached & set(records)))
    errors: Counter = Counter()
    fresh = [r for k, r in records.items() if k in run_keys]
    for r in records.values():
        s.tokens_in += r["input_tokens"]
        s.tokens_out += r["output_tokens"]
        s.failed += r["status"] == "failed"
        s.blocked += r["status"] == "blocked"
        if r["error"]:
            errors[r["error"].split(":")[0]] += 1
    for r in fresh:
        s.calls += r["attempts"]
        s.retries += r["retries"]
        s.throttled_429 += r["throttled"]
    if len(fresh) > 1:
        ends = sorted(r["finished_at"] for r in fresh)
        span = ends[-1] - ends[0]
        s.requests_per_minute = (len(fresh) - 1) / span * 60 if span > 0 else 0.0
    s.errors = dict(errors)
    return s


def bounded_answer(answer: prompts.Answer, bounds: grammar.Bounds) -> str:
    """The teacher's parsed answer re-written within the grammar's bounds: what SFT trains on, so the
    student learns answers the constrained decoder of evaluation and serving can produce."""
    items = [
        prompts.CodeItem(i.code, grammar.clean_evidence(i.evidence, bounds.max_evidence_chars))
        for i in answer.items[: bounds.max_codes]
    ]
    return prompts.render_answer(grammar.clean_reasoning(answer.reasoning, bounds.max_reasoning_chars), items)


def _choose(
    notes: pa.Table,
    records: dict[str, dict[str, Any]],
    cfg: TeacherConfig,
    threshold: float,
    bounds: grammar.Bounds,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per note: the sample agreeing best with gold; kept when it reaches the threshold."""
    exemplars, outcomes = [], []
    for row in notes.to_pylist():
        h = note_hash(row["note"], row["medications"])
        samples = [records.get(cache_key(h, cfg, k, bounds)) for k in range(cfg.samples_per_note)]
        answered = [(k, r) for k, r in enumerate(samples) if r and r["status"] == "ok"]
        best, best_f1, best_answer = None, -1.0, None
        for k, r in answered:
            answer = prompts.parse_answer(r["text"])
            f1 = metrics.prf(answer.codes, row["codes"])[2] if answer.ok else 0.0
            if f1 > best_f1:
                best, best_f1, best_answer = k, f1, answer
        attempts = sum(r["attempts"] for r in samples if r)
        if best is None:
            statuses = {r["status"] for r in samples if r}
            status = "blocked" if "blocked" in statuses else "failed" if statuses else "missing"
            err = next((r["error"] for r in samples if r and r["error"]), "")
            outcomes.append(
                {
                    "hadm_id": row["hadm_id"],
                    "subject_id": row["subject_id"],
                    "status": status,
                    "best_sample": None,
                    "agreement_f1": None,
                    "attempts": attempts,
                    "error": err,
                }
            )
            continue
        kept = best_f1 >= threshold
        outcomes.append(
            {
                "hadm_id": row["hadm_id"],
                "subject_id": row["subject_id"],
                "status": "kept" if kept else "rejected",
                "best_sample": best,
                "agreement_f1": best_f1,
                "attempts": attempts,
                "error": "" if kept else f"agreement {best_f1:.2f} < {threshold}",
            }
        )
        if kept:
            r = samples[best]
            exemplars.append(
                {
                    "hadm_id": row["hadm_id"],
                    "subject_id": row["subject_id"],
                    "note": row["note"],
                    "medications": row["medications"] or [],
                    "gold_codes": row["codes"],
                    "prompt": prompts.render_user_prompt(row["note"], row["medications"] or []),
                    "answer": bounded_answer(best_answer, bounds),
                    "teacher_text": r["text"],
                    "answer_codes": best_answer.codes,
                    "answer_flags": sorted(best_answer.flags),
                    "agreement_f1": best_f1,
                    "sample_index": best,
                    "teacher_backend": r["teacher_backend"],
                    "teacher_model": r["teacher_model"],
                    "prompt_version": r["prompt_version"],
                    "created_at": r["created_at"],
                    "input_tokens": r["input_tokens"],
                    "output_tokens": r["output_tokens"],
                }
            )
    return exemplars, outcomes


def _collect(
    notes: pa.Table, cfg: TeacherConfig, with_gold: bool, out_root: str, bounds: grammar.Bounds
) -> tuple[pa.Table, dict[str, dict[str, Any]], set[str], set[str], int, float]:
    """Make every pending call (or none, if all are cached); return the records of all samples.

    Also returns how many cache files could not be read: their calls are made again and they are
    counted in the summary.
    """
    start = time.time()
    items = _work_items(notes, cfg, with_gold, bounds)
    keys = items["key"].to_pylist()
    cache = ResultCache(out_root)
    known, unreadable = cache.get_many(sorted(cache.keys() & set(keys)))
    cached = set(known)
    if cfg.retry_failed:  # calls that failed for good last time get another chance; answers are kept
        cached -= {k for k, r in known.items() if r["status"] == "failed"}
    pending = items.filter(pa.array([k not in cached for k in keys]))
    log.info(
        "%d samples, %d cached, %d unreadable cache files, %d to call",
        items.num_rows,
        len(cached),
        len(unreadable),
        pending.num_rows,
    )
    if pending.num_rows:
        _run_calls(pending, cfg, out_root, bounds)
    records, _ = cache.get_many(keys)
    return items, records, set(pending["key"].to_pylist()), cached, len(unreadable), time.time() - start


def run(cfg: Config) -> Summary:
    """Distill exemplars for the train split. Needs Ray initialised."""
    tcfg = cfg.teacher
    teacher.check_data_use(tcfg)  # before reading any note
    notes = _read_notes(cfg.storage, "train", tcfg.limit)
    out_root = layout.Layout(cfg.storage).exemplars
    _, records, run_keys, cached, unreadable, seconds = _collect(
        notes, tcfg, with_gold=uses_gold(tcfg), out_root=out_root, bounds=cfg.answer
    )
    exemplars, outcomes = _choose(notes, records, tcfg, tcfg.min_agreement_f1, cfg.answer)
    _write(out_root, exemplars, outcomes)
    s = _summarise(records, run_keys, cached)
    s.notes, s.seconds, s.unreadable_cache = notes.num_rows, seconds, unreadable
    s.kept = sum(o["status"] == "kept" for o in outcomes)
    s.rejected = sum(o["status"] == "rejected" for o in outcomes)
    s.cost_usd = teacher.cost_usd(s.tokens_in, s.tokens_out, tcfg) if tcfg.backend != "reference" else 0.0
    s.teacher = {
        "backend": tcfg.backend,
        "model": teacher.ReferenceTeacher.model if tcfg.backend == "reference" else tcfg.model,
        "prompt_version": prompts.PROMPT_VERSION,
        "show_gold": tcfg.show_gold,
        "min_agreement_f1": tcfg.min_agreement_f1,
        "samples_per_note": tcfg.samples_per_note,
    }
    storage.write_json(layout.Layout(cfg.storage).exemplars_summary, asdict(s))
    return s


def _write(out_root: str, exemplars: list[dict[str, Any]], outcomes: list[dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(out_root)
    fs.create_dir(path, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
            fs.delete_file(
                info.path
            )  # replace the previous run's exemplars; the cache is the source of truth
    if exemplars:
        pq.write_table(pa.Table.from_pylist(exemplars), f"{path}/part-0.parquet", filesystem=fs)
    fs.create_dir(f"{path}/_outcomes", recursive=True)
    pq.write_table(
        pa.Table.from_pylist(outcomes, schema=OUTCOME_SCHEMA),
        f"{path}/_outcomes/part-0.parquet",
        filesystem=fs,
    )


def predict(cfg: Config, split: str = "test", out_dir: str = "") -> dict[str, Any]:
    """The teacher as a predictor: no gold codes in the prompt, scored by `metrics` on `split`."""
    tcfg = cfg.teacher
    if tcfg.backend == "reference":
        raise ValueError("the reference teacher copies gold codes; only a real teacher (gemini) can predict")
    teacher.check_data_use(tcfg)
    notes = _read_notes(cfg.storage, split, tcfg.limit)
    plain = TeacherConfig(**{**asdict(tcfg), "show_gold": False, "samples_per_note": 1})
    out_root = layout.Layout(cfg.storage).exemplars  # same cache: an identical request is never paid twice
    items, records, run_keys, cached, unreadable, seconds = _collect(
        notes, plain, with_gold=False, out_root=out_root, bounds=cfg.answer
    )
    preds, flags = [], Counter()
    for key in items["key"].to_pylist():
        r = records.get(key)
        answer = prompts.parse_answer(r["text"] if r and r["status"] == "ok" else "")
        preds.append(answer.codes)
        flags.update(answer.flags)
    gold = notes["codes"].to_pylist()
    train_counts = layout.train_code_counts(cfg.storage)
    s = _summarise(records, run_keys, cached)
    s.mode, s.notes, s.seconds, s.unreadable_cache = "predict", notes.num_rows, seconds, unreadable
    s.cost_usd = teacher.cost_usd(s.tokens_in, s.tokens_out, tcfg)
    name = f"teacher-{tcfg.model}"
    result = {
        "model": name,
        "split": split,
        "metrics": metrics.score(preds, gold, train_counts=train_counts),
        "answer_flags": dict(flags),
        "summary": asdict(s),
    }
    storage.write_json(
        storage.join(out_dir, f"{name}.json") if out_dir else layout.Layout(cfg.storage).report(name), result
    )
    return result
