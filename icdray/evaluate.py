"""Evaluate any model on a prepared split: batched greedy generation on Ray Data, parsed and scored.

    prompts/<split> --Ray Data map_batches(Coder actor pool: one engine each, icdray.engine)-->
        answers (constrained and/or free) --prompts.parse_answer--> codes --results.make_row-->
        reports/<name>.json (constrained: the coding score) and reports/<name>-free.json (free: the format)

The engine and its settings are the rollouts' (`evaluate.engine`, an `EngineConfig`): vLLM by default,
transformers for models vLLM cannot load. Two rows per model on the vLLM engine, from one pass:
- constrained: decoding under the answer grammar of the run's label space, codes never repeated. The
  answer always parses, every code is valid: the row measures coding.
- free: no grammar. The row measures whether the model has learned the format.
The free pass runs second on the same engine, so the notes' prompt KV blocks are reused from the
prefix cache. Greedy decoding, so a score is reproducible.
Left out: sampling-based self-consistency (serving's confidence uses it).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa

from icdray import chat, grammar, layout, models, prompts, results
from icdray.config import Config, EngineConfig, InputConfig
from icdray.engine import SamplingSpec, cpu_bind, make_engine

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
    ) -> None:
        self.engine = make_engine(model, engine, constraint)
        self.tok = self.engine.tok
        self.modes, self.inputs = modes, inputs
        self.max_tokens = {"constrained": constraint.max_tokens if constraint else 0, "free": max_new_tokens}

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = [
            chat.encode_prompt(self.tok, n, m, self.inputs.max_prompt_tokens, self.inputs.thinking)
            for n, m in zip(batch["note"].to_pylist(), batch["medications"].to_pylist(), strict=True)
        ]
        out: dict[str, Any] = {"hadm_id": batch["hadm_id"], "prompt_tokens": [len(i) for i in ids]}
        for mode in self.modes:
            t = time.time()
            spec = SamplingSpec(
                n=1, temperature=0.0, max_tokens=self.max_tokens[mode], constrained=mode == "constrained"
            )
            groups = self.engine.generate(ids, spec)
            out[f"answer_{mode}"] = [g[0].text for g in groups]
            out[f"tokens_{mode}"] = [len(g[0].token_ids) for g in groups]
            out[f"seconds_{mode}"] = [time.time() - t] * batch.num_rows
        return pa.table(out)


def default_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", model.rstrip("/").split("/")[-1] if "/" in model else model)


def run(cfg: Config, model: str, name: str = "", role: str = "base") -> dict[str, Any]:
    """Generate, parse and score `model` on `evaluate.split`. Needs Ray initialised.

    Writes one report row per mode and returns {"rows": [...], "seconds", "generated_tokens", "tokens_per_s"}.
    """
    import ray

    ecfg = cfg.evaluate
    start = time.time()
    table = layout.read_split(cfg.storage, ecfg.split, ["hadm_id", "note", "medications", "codes"])
    if ecfg.limit:
        table = table.slice(0, ecfg.limit)
    path = models.resolve(model)  # fail fast (and build a registry model once) before starting actors
    constrained = ecfg.engine.constrained and ecfg.engine.backend == "vllm"
    constraint = grammar.constraint(layout.label_space(cfg.storage), cfg.answer) if constrained else None
    modes = ("constrained", "free") if constrained else ("free",)
    max_len = (
        cfg.inputs.max_prompt_tokens
        + max(ecfg.max_new_tokens, constraint.max_tokens if constraint else 0)
        + 8
    )
    engine = replace(
        ecfg.engine,
        threads=ecfg.engine.threads or max(1, int(ecfg.cpus_per_worker)),
        threads_bind=cpu_bind(ecfg.engine.threads_bind),
        max_model_len=max(ecfg.engine.max_model_len, max_len),
    )
    rows_per_batch = max(1, ecfg.batch_size)
    ds = ray.data.from_arrow(
        [table.slice(i, rows_per_batch) for i in range(0, table.num_rows, rows_per_batch)]
    )
    ds = ds.map_batches(
        Coder,
        batch_format="pyarrow",
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=ecfg.workers),
        num_cpus=ecfg.cpus_per_worker,
        num_gpus=ecfg.gpus_per_worker,
        fn_constructor_kwargs={
            "model": path,
            "engine": engine,
            "constraint": constraint,
            "modes": modes,
            "max_new_tokens": ecfg.max_new_tokens,
            "inputs": cfg.inputs,
        },
    )
    out = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("hadm_id")
    by_id = {h: i for i, h in enumerate(out["hadm_id"].to_pylist())}
    hadm = table["hadm_id"].to_pylist()
    order = [by_id[h] for h in hadm]
    gold, note_texts = table["codes"].to_pylist(), table["note"].to_pylist()
    counts = layout.train_code_counts(cfg.storage)
    space = layout.label_space_name(cfg.storage)
    name = name or default_name(model)
    rows, generated = [], 0
    for mode in modes:
        texts = [out[f"answer_{mode}"][i].as_py() for i in order]
        parsed = [prompts.parse_answer(t) for t in texts]
        tokens = sum(out[f"tokens_{mode}"].to_pylist())
        generated += tokens
        row = results.make_row(
            name if mode == "constrained" else f"{name}-free",
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
                "mean_prompt_tokens": sum(out["prompt_tokens"].to_pylist()) / max(1, len(texts)),
                "seconds": round(max(out[f"seconds_{mode}"].to_pylist() or [0.0]), 1),
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
    }
