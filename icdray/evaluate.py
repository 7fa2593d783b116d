"""Evaluate any model on a prepared split: batched greedy generation on Ray Data, parsed and scored.

    prompts/<split> --Ray Data map_batches(Coder actor pool: one engine each, icdray.engine)-->
        answers (constrained and/or free) --prompts.parse_answer--> codes --results.make_row-->
        reports/<name>.json (constrained: the coding score) and reports/<name>-free.json (free: the format)

The engine and its settings are the rollouts' (`evaluate.engine`, an `EngineConfig`): vLLM by default,
transformers for models vLLM cannot load. Two rows per model on the vLLM engine, from one pass:
- constrained: decoding under the answer grammar of the run's label space, codes never repeated. The
  answer always parses, every code is valid: the row measures coding.
- free: no grammar. The row measures whether the model has learned the format.
Both modes decode as one batch on the same engine (the free requests last, so they reuse their notes'
prompt KV blocks from the prefix cache). Greedy decoding, so a score is reproducible.
Each row's answers are kept in `reports/predictions/<name>.jsonl` (codes with their evidence and the
decoder's confidence, gold, flags): what an error analysis reads. `calibrate` fits the final model's
confidence on validation and tunes the decision rule's cut (`confidence.tune_cut`); `rule_row` scores
the test answers under that rule (a code stays when its quote is in the note and its confidence
reaches the cut) as one more row, `<name>-supported`.
Left out: sampling-based self-consistency (serving's confidence uses it).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from icdray import chat, confidence, evidence, grammar, layout, models, prompts, results, storage
from icdray.config import Config, EngineConfig, InputConfig
from icdray.engine import SamplingSpec, bound_cores, cpu_bind, make_engine

log = logging.getLogger(__name__)


class Coder:
    """Ray Data actor holding one engine; answers a batch of notes in every requested mode."""

    def __init__(
        self,
        model: str,
        engine: EngineConfig,
        constraint: grammar.AnswerConstraint | None,
        modes: tuple[str, ...],
        max_new_tokens: int,
        inputs: InputConfig,
        free_ids: list[int] | None = None,
    ) -> None:
        self.engine = make_engine(model, engine, constraint)
        self.tok = self.engine.tok
        self.modes, self.inputs = modes, inputs
        self.max_tokens = {"constrained": constraint.max_tokens if constraint else 0, "free": max_new_tokens}
        self.free_ids = None if free_ids is None else set(free_ids)  # None: every note

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [
            chat.encode_prompt(self.tok, n, m, self.inputs.max_prompt_tokens, self.inputs.thinking)
            for n, m in zip(batch["note"].to_pylist(), batch["medications"].to_pylist(), strict=True)
        ]
        out: dict[str, Any] = {"hadm_id": batch["hadm_id"], "prompt_tokens": [len(i) for i in ids]}
        hadm = batch["hadm_id"].to_pylist()
        # every mode's requests in one batch (the free ones last, so they find their notes' prompt blocks
        # in the prefix cache): the few free answers ride along with the constrained ones
        requests = [
            (mode, i)
            for mode in self.modes
            for i, h in enumerate(hadm)
            if mode == "constrained" or self.free_ids is None or h in self.free_ids
        ]
        specs = [
            SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens[m], constrained=m == "constrained")
            for m, _ in requests
        ]
        t = time.time()
        answers = self.engine.generate([ids[i] for _, i in requests], specs) if requests else []
        seconds = time.time() - t
        got = {r: a[0] for r, a in zip(requests, answers, strict=True)}
        for mode in self.modes:
            samples = [got.get((mode, i)) for i in range(len(hadm))]
            out[f"answer_{mode}"] = [s.text if s else None for s in samples]
            out[f"tokens_{mode}"] = [len(s.token_ids) if s else 0 for s in samples]
            out[f"ids_{mode}"] = [s.token_ids if s else [] for s in samples]
            out[f"logprobs_{mode}"] = [s.logprobs if s else [] for s in samples]
        out["seconds"] = [seconds] * batch.num_rows
        return pa.table(out)


def default_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", model.rstrip("/").split("/")[-1] if "/" in model else model)


def engine_settings(cfg: Config, max_new_tokens: int, **overrides: Any) -> EngineConfig:
    """`evaluate.engine` for one Ray Data actor: its CPU share as threads, room for prompt + answer."""
    ecfg = cfg.evaluate
    return replace(
        ecfg.engine,
        threads=ecfg.engine.threads or max(1, int(ecfg.cpus_per_worker)),
        threads_bind=cpu_bind(ecfg.engine.threads_bind),
        max_model_len=max(ecfg.engine.max_model_len, cfg.inputs.max_prompt_tokens + max_new_tokens + 8),
        **overrides,
    )


def on_actor_pool(table: pa.Table, actor: type, ecfg: Any, kwargs: dict[str, Any]) -> pa.Table:
    """`table` through `evaluate.workers` actors of `actor` (one engine each) in batches of
    `evaluate.batch_size` rows; the outputs concatenated (in completion order)."""
    import ray

    extra: dict[str, Any] = {}
    engine: EngineConfig = kwargs["engine"]
    if engine.device == "cpu":
        # Ray Data may call the actor from another thread than the one that built the engine, and an
        # OpenMP thread count set on one thread is not another's: Ray's OMP_NUM_THREADS (the actor's CPU
        # share) must equal the cores vLLM binds, or its CPU attention aborts ("thread_num 1 vs. 2")
        threads = str(bound_cores(engine.threads_bind))
        extra["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": threads}}
    size = max(1, ecfg.batch_size)
    ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
    ds = ds.map_batches(
        actor,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=ecfg.workers),
        num_cpus=ecfg.cpus_per_worker,
        num_gpus=ecfg.gpus_per_worker,
        fn_constructor_kwargs=kwargs,
        **extra,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def constrained(cfg: Config) -> bool:
    """Whether evaluation decodes under the answer grammar (the vLLM engine only)."""
    return cfg.evaluate.engine.constrained and cfg.evaluate.engine.backend == "vllm"


def _notes(cfg: Config, split: str, limit: int) -> pa.Table:
    table = layout.read_split(cfg.storage, split, ["hadm_id", "note", "medications", "codes"])
    return table.slice(0, limit) if limit else table


def _answers(
    cfg: Config,
    model: str,
    split: str,
    modes: tuple[str, ...] | None = None,
    limit: int | None = None,
    calibration: pa.Table | None = None,
) -> tuple[Any, Any, str, Any]:
    """(notes of the split, the engine's answers aligned with them, the model's local path, the constraint).
    `calibration` notes (validation) ride along in the same pass, constrained only; their rows follow the
    split's in both tables."""

    ecfg = cfg.evaluate
    table = _notes(cfg, split, ecfg.limit if limit is None else limit)
    path = models.resolve(model)  # fail fast (and build a registry model once) before starting actors
    grammared = constrained(cfg)
    constraint = grammar.constraint(layout.label_space(cfg.storage), cfg.answer) if grammared else None
    if modes is None:
        modes = ("free",) if not grammared else ("constrained", "free")[: 1 + (ecfg.free_limit >= 0)]
    free_ids = table["hadm_id"].to_pylist()[: ecfg.free_limit] if grammared and ecfg.free_limit > 0 else None
    max_new = max(ecfg.max_new_tokens, constraint.max_tokens if constraint else 0)
    kwargs = {
        "model": path,
        "engine": engine_settings(cfg, max_new),
        "constraint": constraint,
        "modes": modes,
        "max_new_tokens": ecfg.max_new_tokens,
        "inputs": cfg.inputs,
        "free_ids": free_ids,
    }
    if calibration is not None:
        kwargs["free_ids"] = free_ids or table["hadm_id"].to_pylist()  # never the calibration notes
        table = pa.concat_tables([table, calibration])
    out = on_actor_pool(table, Coder, ecfg, kwargs).sort_by("hadm_id")
    by_id = {h: i for i, h in enumerate(out["hadm_id"].to_pylist())}
    return table, out.take([by_id[h] for h in table["hadm_id"].to_pylist()]), path, constraint


@functools.lru_cache(maxsize=4)
def token_pieces(path: str) -> tuple[str, ...]:
    """Each token id's own text under the model's tokenizer (what `confidence.code_scores` reads)."""
    from transformers import AutoTokenizer

    return chat.token_pieces(AutoTokenizer.from_pretrained(path))


def scored_codes(
    answer: prompts.Answer, ids: list[int], logprobs: list[float], path: str, note: str
) -> list[confidence.Scored]:
    """(code, raw confidence, its quote is in the note) for each code of `answer`, in answer order; the
    confidence is 0 where no logprob covers the code."""
    scores = confidence.code_scores(ids, logprobs, token_pieces(path)) if ids and logprobs else {}
    quotes = {i.code: i.evidence for i in answer.items}
    return [(c, scores.get(c, 0.0), evidence.quote_in_note(note, quotes.get(c, ""))) for c in answer.codes]


def save_predictions(
    root: str,
    name: str,
    hadm: list[int],
    gold: list[list[str]],
    answers: list[prompts.Answer],
    scored: list[list[confidence.Scored]],
) -> str:
    """`reports/predictions/<name>.jsonl`: one line per admission."""
    lines = []
    for h, g, a, sc in zip(hadm, gold, answers, scored, strict=True):
        quotes = {i.code: i.evidence for i in a.items}
        lines.append(
            json.dumps(
                {
                    "hadm_id": h,
                    "gold": g,
                    "codes": [
                        {"code": c, "evidence": quotes.get(c, ""), "confidence": round(x, 6), "found": found}
                        for c, x, found in sc
                    ],
                    "flags": sorted(a.flags),
                }
            )
        )
    path = layout.Layout(root).predictions(name)
    storage.write_text(path, "\n".join(lines) + "\n")
    return path


def read_predictions(root: str, name: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in storage.read_text(layout.Layout(root).predictions(name)).splitlines()
        if line
    ]


def run(
    cfg: Config,
    model: str,
    name: str = "",
    role: str = "base",
    calibrate: bool = False,
    calibrate_as: str = "",
) -> dict[str, Any]:
    """Generate, parse and score `model` on `evaluate.split`. Needs Ray initialised.

    Writes one report row per mode and returns {"rows": [...], "seconds", "generated_tokens", "tokens_per_s"}.
    With `calibrate` (constrained decoding only), the calibration notes decode in the same pass and
    `reports/calibration.json` is fitted from them (what `calibrate` does in a pass of its own), under
    "calibration" in the result; `calibrate_as` names the model it is saved for when that is another row
    with the same weights (the GRPO gate exported the SFT model), else it is `name`'s.
    """
    ecfg = cfg.evaluate
    start = time.time()
    name = name or default_name(model)
    val = _notes(cfg, "val", ecfg.calibration_limit) if calibrate else None
    table, out, path, constraint = _answers(cfg, model, ecfg.split, calibration=val)
    fitted = None
    if val is not None:
        if constraint is None:
            raise ValueError(_NEEDS_GRAMMAR)
        n = table.num_rows - val.num_rows
        fitted = _fit(cfg, calibrate_as or name, path, val, out.slice(n), pass_of=name)
        table, out = table.slice(0, n), out.slice(0, n)
    modes = tuple(m for m in ("constrained", "free") if f"answer_{m}" in out.column_names)
    counts = layout.train_code_counts(cfg.storage)
    space = layout.label_space_name(cfg.storage)
    rows, generated = [], 0
    for mode in modes:
        # the free pass may cover only the first `free_limit` notes: score those
        keep = [i for i, t in enumerate(out[f"answer_{mode}"].to_pylist()) if t is not None]
        sub, ans = table.take(keep), out.take(keep)
        hadm = sub["hadm_id"].to_pylist()
        gold, note_texts = sub["codes"].to_pylist(), sub["note"].to_pylist()
        texts = ans[f"answer_{mode}"].to_pylist()
        parsed = [prompts.parse_answer(t) for t in texts]
        row_name = name if mode == "constrained" else f"{name}-free"
        scored = [
            scored_codes(a, i, lp, path, n)
            for a, i, lp, n in zip(
                parsed,
                ans[f"ids_{mode}"].to_pylist(),
                ans[f"logprobs_{mode}"].to_pylist(),
                note_texts,
                strict=True,
            )
        ]
        save_predictions(cfg.storage, row_name, hadm, gold, parsed, scored)
        tokens = sum(out[f"tokens_{mode}"].to_pylist())
        generated += tokens
        row = results.make_row(
            row_name,
            role,
            space,
            hadm,
            [a.codes for a in parsed],
            gold,
            constrained=mode == "constrained",
            answers=parsed,
            notes=note_texts,
            train_counts=counts,
            extra={
                "model_path": path,
                "split": ecfg.split,
                "engine": ecfg.engine.backend,
                "generated_tokens": tokens,
                "mean_answer_tokens": tokens / max(1, len(texts)),
                "mean_prompt_tokens": sum(ans["prompt_tokens"].to_pylist()) / max(1, len(texts)),
                "seconds": round(max(out["seconds"].to_pylist() or [0.0]), 1),  # the pass (both modes)
                "config": {"limit": ecfg.limit, "split": ecfg.split, "max_new_tokens": ecfg.max_new_tokens},
                "examples": [
                    {
                        "hadm_id": h,
                        "gold": g,
                        "predicted": a.codes,
                        "flags": sorted(a.flags),
                        "answer": t[:2000],
                    }
                    for h, g, a, t in zip(hadm[:3], gold[:3], parsed[:3], texts[:3], strict=False)
                ],
            },
        )
        results.save_row(cfg.storage, row)
        rows.append(row)
    seconds = time.time() - start
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / max(1e-6, seconds), 1),
        **({"calibration": fitted} if fitted is not None else {}),
    }


def reuse(cfg: Config, source: str, name: str, role: str, model_path: str, why: str) -> list[dict[str, Any]]:
    """Rows `name` (and `name-free`) copied from rows `source` of a model with bit-identical weights
    (the GRPO gate exported its start model): greedy decoding of the same weights on the same notes gives
    the same answers, so they are not decoded again. Each row says where it came from and why."""
    where, rows = layout.Layout(cfg.storage), []
    for suffix in ("", "-free"):
        if not storage.exists(where.report(source + suffix)):
            continue
        row = storage.read_json(where.report(source + suffix))
        row.update(
            model=name + suffix, role=role, model_path=model_path, reused_from=source + suffix, reused_why=why
        )
        results.save_row(cfg.storage, row)
        if storage.exists(where.predictions(source + suffix)):
            storage.write_text(
                where.predictions(name + suffix), storage.read_text(where.predictions(source + suffix))
            )
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no report row {source!r} under {where.reports} to reuse; evaluate it first")
    return rows


_NEEDS_GRAMMAR = "calibration needs constrained decoding (evaluate.engine.constrained=true, backend vllm)"


def calibrate(cfg: Config, model: str, name: str) -> dict[str, Any]:
    """Fit the confidence calibration of `model` on the validation split (constrained greedy answers: each
    code's raw score vs whether it is in gold) and save it as `reports/calibration.json`, which Serve loads.
    A pass of its own; `run(..., calibrate=True)` does the same inside the test pass."""
    start = time.time()
    table, out, path, constraint = _answers(
        cfg, model, "val", ("constrained",), limit=cfg.evaluate.calibration_limit
    )
    if constraint is None:
        raise ValueError(_NEEDS_GRAMMAR)
    return _fit(cfg, name, path, table, out, time.time() - start)


def _fit(
    cfg: Config,
    name: str,
    path: str,
    table: pa.Table,
    out: pa.Table,
    seconds: float | None = None,
    pass_of: str = "",
) -> dict[str, Any]:
    """Calibration and the decision rule's cut from the constrained answers `out` to the validation notes
    `table`; saved as `reports/calibration.json` (with the answers as predictions `<name>@val`). `seconds`:
    the notes had a pass of their own that took this long; else they decoded in the test pass of row
    `pass_of`."""
    start = time.time()
    golds = table["codes"].to_pylist()
    parsed = [prompts.parse_answer(t) for t in out["answer_constrained"].to_pylist()]
    answers = [
        scored_codes(a, ids, lps, path, note)
        for a, ids, lps, note in zip(
            parsed,
            out["ids_constrained"].to_pylist(),
            out["logprobs_constrained"].to_pylist(),
            table["note"].to_pylist(),
            strict=True,
        )
    ]
    save_predictions(cfg.storage, f"{name}@val", table["hadm_id"].to_pylist(), golds, parsed, answers)
    raw = [x for a in answers for _, x, _ in a]
    correct = [c in g for a, g in zip(answers, golds, strict=True) for c, _, _ in a]
    cal = confidence.fit(raw, correct, cfg.evaluate.auto_precision)
    cut, rule_f1, written_f1 = confidence.tune_cut(answers, golds)
    cal.cut = cut
    result = {
        "model": name,
        "model_path": path,
        "split": "val",
        "notes": table.num_rows,
        "calibration": cal.to_dict(),
        # the decision rule (quote in the note, confidence >= cut) and validation sample-F1 with/without it
        "rule": {"cut": cut, "val_sample_f1": rule_f1, "val_sample_f1_as_written": written_f1},
        # seconds: of its own pass, or of fitting only when its notes decoded in the test pass
        "seconds": round((seconds or 0.0) + time.time() - start, 1),
        "decoded_with": "own pass" if seconds is not None else f"the {cfg.evaluate.split} pass",
        **({"pass_of": pass_of} if seconds is None else {}),
    }
    storage.write_json(storage.join(layout.Layout(cfg.storage).reports, "calibration.json"), result)
    return result


def rule_row(cfg: Config, name: str, role: str, cut: float, tuned_on: int) -> dict[str, Any]:
    """Row `<name>-supported`: `name`'s saved test answers under the decision rule (`confidence.apply_cut`):
    a code stays when its quote is in the note and its confidence reaches `cut` (tuned on validation)."""
    preds = read_predictions(cfg.storage, name)
    split = layout.read_split(cfg.storage, cfg.evaluate.split, ["hadm_id", "note"])
    notes = dict(zip(split["hadm_id"].to_pylist(), split["note"].to_pylist(), strict=True))
    kept = [
        confidence.apply_cut([(c["code"], c["confidence"], c["found"]) for c in p["codes"]], cut)
        for p in preds
    ]
    answers = [
        prompts.Answer(
            "",
            tuple(prompts.CodeItem(c["code"], c["evidence"]) for c in p["codes"] if c["code"] in k),
            frozenset(),
        )
        for p, k in zip(preds, kept, strict=True)
    ]
    row = results.make_row(
        f"{name}-supported",
        role,
        layout.label_space_name(cfg.storage),
        [p["hadm_id"] for p in preds],
        kept,
        [p["gold"] for p in preds],
        constrained=True,
        answers=answers,
        notes=[notes[p["hadm_id"]] for p in preds],
        train_counts=layout.train_code_counts(cfg.storage),
        extra={"rule_of": name, "cut": cut, "cut_tuned_on_val_notes": tuned_on, "split": cfg.evaluate.split},
    )
    results.save_row(cfg.storage, row)
    return row
