"""Batch coding: a worklist of notes coded overnight, on Ray Data, the way Serve codes one.

    NOTES (a folder of .txt files, or a parquet/CSV table with a `note` column and an id column)
        -> malformed rows counted and set aside (DIR/_skipped.parquet: id and reason, never the text)
        -> Ray Data map_batches(ChartCoder actor pool: the vLLM engine, constrained decoding)
        -> coding.annotate: codes with evidence spans and calibrated confidence, edits, MS-DRG
        -> DIR/codes.parquet (one row per note) [-> DIR/fhir/<id>.json: one FHIR R4 Bundle per note]

The engine settings, workers and batch size are evaluation's (`evaluate.*`), the answer bounds and
prompt budget the run's (`answer.*`, `inputs.*`); the label space and the calibration come from the
storage root when the model was trained there. Ray Data prints the progress.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from icdray import chat, coding, evaluate, grammar, layout, models, storage
from icdray.config import Config, EngineConfig, InputConfig
from icdray.engine import SamplingSpec, make_engine

ID_COLUMNS = ("id", "note_id", "hadm_id")
MAX_NOTE_CHARS = 100_000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
CODE_TYPE = pa.struct(
    [
        ("code", pa.string()),
        ("description", pa.string()),
        ("evidence", pa.string()),
        ("evidence_start", pa.int64()),
        ("evidence_end", pa.int64()),
        ("confidence", pa.float64()),
        ("role", pa.string()),
        ("sequence", pa.int32()),
        ("valid", pa.bool_()),
    ]
)
EDIT_TYPE = pa.struct(
    [
        ("severity", pa.string()),
        ("rule", pa.string()),
        ("codes", pa.list_(pa.string())),
        ("message", pa.string()),
    ]
)


@dataclass
class BatchSummary:
    input: str
    output: str
    notes_in: int = 0
    coded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    codes: int = 0
    auto_eligible: int = 0
    fhir_bundles: int = 0
    seconds: float = 0.0

    def format(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return (
            f"code: {self.notes_in} notes in, {self.coded} coded ({self.codes} codes, {self.auto_eligible} charts "
            f"auto-eligible), skipped: {skipped}; {self.fhir_bundles} FHIR bundles; {self.seconds:.0f}s -> {self.output}"
        )


def _reason(note: Any) -> str | None:
    if not isinstance(note, str):
        return "not_text"
    if not note.strip():
        return "empty_note"
    if len(note) > MAX_NOTE_CHARS:
        return "too_long"
    if _CONTROL.search(note):
        return "control_characters"
    return None


def read_notes(path: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(rows to code: id, note, medications, age, sex; rows set aside: id, reason)."""
    rows: list[dict[str, Any]] = []
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.glob("*.txt")):
            try:
                rows.append({"id": f.stem, "note": f.read_bytes().decode("utf-8")})
            except UnicodeDecodeError:
                rows.append({"id": f.stem, "note": None, "_reason": "not_utf8"})
        if not rows:
            raise FileNotFoundError(f"no .txt notes in {path}")
    elif path.endswith((".parquet", ".csv", ".csv.gz")):
        if not storage.exists(path):
            raise FileNotFoundError(f"{path} not found")
        fs, fp = storage.resolve(path)
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(fp, filesystem=fs)
        else:
            import pyarrow.csv as pacsv

            with fs.open_input_stream(fp) as f:
                table = pacsv.read_csv(f, parse_options=pacsv.ParseOptions(newlines_in_values=True))
        if "note" not in table.column_names:
            raise ValueError(f"{path} has no `note` column (columns: {table.column_names})")
        id_col = next((c for c in ID_COLUMNS if c in table.column_names), None)
        if id_col is None:
            raise ValueError(f"{path} needs an id column: one of {list(ID_COLUMNS)}")
        for i, r in enumerate(table.to_pylist()):
            meds = r.get("medications")
            if isinstance(meds, str):
                meds = [m for m in meds.splitlines() if m.strip()]
            rid = r.get(id_col)
            rows.append(
                {
                    "id": str(rid) if rid is not None else f"row-{i}",
                    "note": r["note"],
                    "medications": meds or [],
                    "age": r.get("age"),
                    "sex": r.get("sex"),
                }
            )
    else:
        raise ValueError(f"--input must be a folder of .txt notes or a .parquet/.csv file, got {path}")
    good, bad = [], []
    seen: set[str] = set()
    for r in rows:
        reason = r.pop("_reason", None) or _reason(r["note"])
        if reason is None and r["id"] in seen:
            reason = "duplicate_id"
        if reason:
            bad.append({"id": r["id"], "reason": reason})
            continue
        seen.add(r["id"])
        age = r.get("age")
        good.append(
            {
                "id": r["id"],
                "note": r["note"],
                "medications": [str(m) for m in r.get("medications") or []],
                "age": int(age) if isinstance(age, int | float) and 0 <= age <= 130 else None,
                "sex": r.get("sex") if r.get("sex") in ("M", "F", "U") else None,
            }
        )
    return good, bad


class ChartCoder:
    """Ray Data actor: one engine; codes a batch of notes and annotates every answer."""

    def __init__(
        self, model: str, engine: EngineConfig, constraint: Any, inputs: InputConfig, calibration: Any
    ) -> None:
        self.engine = make_engine(model, engine, constraint)
        self.tok = self.engine.tok
        self.pieces = chat.token_pieces(self.tok)
        self.max_tokens, self.inputs, self.calibration = constraint.max_tokens, inputs, calibration

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        ids = [
            chat.encode_prompt(self.tok, r["note"], r["medications"], self.inputs.max_prompt_tokens)
            for r in rows
        ]
        groups = self.engine.generate(ids, SamplingSpec(n=1, temperature=0.0, max_tokens=self.max_tokens))
        out = []
        for r, g in zip(rows, groups, strict=True):
            s = g[0]
            chart = coding.annotate(
                r["note"], s.text, s.token_ids, s.logprobs, self.pieces, self.calibration, r["age"], r["sex"]
            )
            d = chart.drg or {}
            out.append(
                {
                    "id": r["id"],
                    "codes": [
                        {
                            **{k: v for k, v in c.__dict__.items() if k != "evidence_span"},
                            "evidence_start": c.evidence_span[0] if c.evidence_span else None,
                            "evidence_end": c.evidence_span[1] if c.evidence_span else None,
                        }
                        for c in chart.codes
                    ],
                    "reasoning": chart.reasoning,
                    "edits": chart.edits,
                    "drg": d.get("drg"),
                    "drg_description": d.get("description"),
                    "auto_eligible": chart.auto_eligible,
                    "chart": json.dumps(chart.to_dict()),
                }
            )
        return pa.Table.from_pylist(
            out,
            schema=pa.schema(
                [
                    ("id", pa.string()),
                    ("codes", pa.list_(CODE_TYPE)),
                    ("reasoning", pa.string()),
                    ("edits", pa.list_(EDIT_TYPE)),
                    ("drg", pa.int64()),
                    ("drg_description", pa.string()),
                    ("auto_eligible", pa.bool_()),
                    ("chart", pa.string()),
                ]
            ),
        )


def _calibration(root: str) -> Any:
    from icdray import confidence

    path = storage.join(layout.Layout(root).reports, "calibration.json")
    return (
        confidence.Calibration.from_dict(storage.read_json(path)["calibration"])
        if storage.exists(path)
        else None
    )


def default_model(root: str) -> str:
    where = layout.Layout(root)
    for stage in ("grpo", "sft"):
        if where.done(stage):
            return where.checkpoint(stage)
    raise FileNotFoundError(
        f"no trained model under {root}: pass --model (a checkpoint folder or model name)"
    )


def run(cfg: Config, input_path: str, out_dir: str, model: str = "", fhir: bool = False) -> BatchSummary:
    """Code every note of `input_path` into `out_dir`. Needs Ray initialised."""
    import pyarrow.parquet as pq

    start = time.time()
    summary = BatchSummary(input_path, out_dir)
    good, bad = read_notes(input_path)
    summary.notes_in = len(good) + len(bad)
    for b in bad:
        summary.skipped[b["reason"]] = summary.skipped.get(b["reason"], 0) + 1
    fs, out = storage.resolve(out_dir)
    fs.create_dir(out, recursive=True)
    pq.write_table(
        pa.Table.from_pylist(bad, schema=pa.schema([("id", pa.string()), ("reason", pa.string())])),
        f"{out}/_skipped.parquet",
        filesystem=fs,
    )
    if not good:
        summary.seconds = time.time() - start
        return summary
    path = models.resolve(model or default_model(cfg.storage))
    ecfg = cfg.evaluate
    constraint = grammar.constraint(
        layout.label_space(cfg.storage) if layout.Layout(cfg.storage).done("prepare") else None, cfg.answer
    )
    engine = evaluate.engine_settings(cfg, constraint.max_tokens, constrained=True)
    table = pa.Table.from_pylist(
        good,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("note", pa.string()),
                ("medications", pa.list_(pa.string())),
                ("age", pa.int64()),
                ("sex", pa.string()),
            ]
        ),
    )
    kwargs = {
        "model": path,
        "engine": engine,
        "constraint": constraint,
        "inputs": cfg.inputs,
        "calibration": _calibration(cfg.storage),
    }
    coded = evaluate.on_actor_pool(table, ChartCoder, ecfg, kwargs)
    order = {r["id"]: i for i, r in enumerate(good)}
    coded = coded.take(sorted(range(coded.num_rows), key=lambda i: order[coded["id"][i].as_py()]))
    pq.write_table(coded.drop_columns(["chart"]), f"{out}/codes.parquet", filesystem=fs)
    summary.coded = coded.num_rows
    summary.codes = sum(len(c) for c in coded["codes"].to_pylist())
    summary.auto_eligible = sum(coded["auto_eligible"].to_pylist())
    if fhir:
        from icdray import fhir as fhir_export

        created = time.strftime("%Y-%m-%d", time.gmtime())
        fs.create_dir(f"{out}/fhir", recursive=True)
        for rid, chart in zip(coded["id"].to_pylist(), coded["chart"].to_pylist(), strict=True):
            name = _SAFE.sub("_", rid)
            with fs.open_output_stream(f"{out}/fhir/{name}.json", compression=None) as f:
                f.write(json.dumps(fhir_export.bundle(name, json.loads(chart), created), indent=1).encode())
            summary.fhir_bundles += 1
    summary.seconds = time.time() - start
    storage.write_json(storage.join(out_dir, "_summary.json"), summary.__dict__)
    return summary
