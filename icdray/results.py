"""The results contract: one row per scored model, the paired comparisons, the table's columns.

Every scorer (the prior, baselines, the teacher as predictor, LLM evaluation) builds its row with
`make_row` and saves it with `save_row` (`reports/<model>.json`); `report.py` collects them into
`reports/results.md` and `reports/results.json`:

    {"rows": [{"model", "role": prior|baseline|teacher|base|sft|grpo, "label_space", "n", "sample_f1",
               "sample_f1_ci95": [lo, hi], "micro_f1", "macro_f1", "invalid_rate", "evidence_found_rate",
               "format_ok_rate", "constrained", ...}],
     "comparisons": [{"a", "b", "delta_sample_f1", "ci95": [lo, hi], "n"}]}

A row keeps each admission's F1 (`per_admission`), so two rows are compared on exactly the admissions
both scored, with a paired bootstrap (`metrics.paired_bootstrap`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from icdray import evidence, layout, metrics, storage

ROLES = ("prior", "baseline", "teacher", "base", "sft", "grpo")
COLUMNS = (
    "role",
    "label_space",
    "constrained",
    "n",
    "sample_f1",
    "sample_f1_ci95",
    "micro_f1",
    "macro_f1",
    "invalid_rate",
    "evidence_found_rate",
    "format_ok_rate",
)
# the comparisons every report shows (role a -> role b), when both rows exist
PAIRS = (
    ("base", "sft"),
    ("sft", "grpo"),
    ("base", "grpo"),
    ("prior", "sft"),
    ("prior", "grpo"),
    ("baseline", "grpo"),
)


def make_row(
    model: str,
    role: str,
    label_space: str,
    hadm_ids: Sequence[int],
    predictions: Sequence[Collection[str]],
    golds: Sequence[Collection[str]],
    *,
    constrained: bool | None = None,
    answers: Sequence[Any] | None = None,  # parsed `prompts.Answer`s, for format and evidence rates
    notes: Sequence[str] | None = None,
    train_counts: dict[str, int] | None = None,
    rare_max: int = 10,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    scores = metrics.score(predictions, golds, train_counts=train_counts, rare_max=rare_max)
    f1s = metrics.per_admission_f1(predictions, golds)
    lo, hi = metrics.bootstrap_ci(f1s)
    row: dict[str, Any] = {
        "model": model,
        "role": role,
        "label_space": label_space,
        "constrained": constrained,
        "n": len(f1s),
        "sample_f1": scores["sample_f1"],
        "sample_f1_ci95": [lo, hi],
        "micro_f1": scores["micro_f1"],
        "macro_f1": scores["macro_f1"],
        "invalid_rate": scores["invalid_rate"],
        "evidence_found_rate": None,
        "format_ok_rate": None,
        "metrics": scores,
        "per_admission": {str(h): f for h, f in zip(hadm_ids, f1s, strict=True)},
    }
    if answers is not None:
        row["format_ok_rate"] = sum(a.ok for a in answers) / max(1, len(answers))
        if notes is not None:
            items = [(n, i.evidence) for a, n in zip(answers, notes, strict=True) for i in a.items]
            row["evidence_found_rate"] = sum(evidence.quote_in_note(n, q) for n, q in items) / max(
                1, len(items)
            )
    row.update(extra or {})
    return row


def save_row(root: str, row: dict[str, Any]) -> str:
    path = layout.Layout(root).report(row["model"])
    storage.write_json(path, row)
    return path


def collect(root: str) -> list[dict[str, Any]]:
    """Every saved row under `<root>/reports`, in pipeline order (prior, baselines, teacher, base, sft, grpo)."""
    import json

    import pyarrow.fs as pafs

    fs, path = storage.resolve(layout.Layout(root).reports)
    rows = []
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.extension != "json" or info.base_name.startswith("_") or info.base_name == "results.json":
            continue
        with fs.open_input_stream(info.path, compression=None) as f:
            data = json.loads(f.read().decode())
        if isinstance(data, dict) and data.get("role") in ROLES:
            rows.append(data)
    return sorted(rows, key=lambda r: (ROLES.index(r["role"]), r.get("constrained") is False, r["model"]))


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    common = sorted(set(a["per_admission"]) & set(b["per_admission"]))
    delta, lo, hi = metrics.paired_bootstrap(
        [a["per_admission"][h] for h in common], [b["per_admission"][h] for h in common]
    )
    return {"a": a["model"], "b": b["model"], "delta_sample_f1": delta, "ci95": [lo, hi], "n": len(common)}


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired bootstrap of sample-F1 for each of `PAIRS` (constrained LLM rows, same label space), then
    each decision-rule row against the answers it filters, the prior and the baseline."""
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("constrained") is not False and "per_admission" in r and not r.get("rule_of"):
            first.setdefault(r["role"], r)
    pairs = [(first.get(a), first.get(b)) for a, b in PAIRS]
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        if r.get("rule_of"):
            pairs += [(by_name.get(r["rule_of"]), r), (first.get("prior"), r), (first.get("baseline"), r)]
    return [
        _compare(a, b)
        for a, b in pairs
        if a is not None and b is not None and a["label_space"] == b["label_space"]
    ]


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its per-admission scores (for results.json)."""
    return {k: v for k, v in row.items() if k != "per_admission"}


def cell(value: Any) -> str:
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(x, float) for x in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    if value is None:
        return metrics.MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """The results table (GitHub markdown): one row per model, `columns` from each row or its metrics."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for r in rows:
        cells = [cell(r.get(c, r.get("metrics", {}).get(c))) for c in columns]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
