"""The results report: every evaluated model in one table (the prototype's shape, extended) plus plots.

    reports/*.json (baseline, base, SFT, SFT+GRPO, teacher-as-predictor ...) -> reports/results.md
    checkpoints/grpo/metrics.jsonl -> reports/grpo_curves.png (reward and validation F1 per step)
    -> reports/sample_f1.png (sample-F1 per model)

Columns: sample-F1 (the prototype's metric), micro-F1, macro-F1, hierarchical F1, invalid-code rate and
rare-code micro-F1, all from `metrics.score`. Models are ordered by pipeline stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from icdray import metrics, storage

COLUMNS = ("n", "sample_f1", "micro_f1", "macro_f1", "hierarchical_f1", "invalid_rate", "rare_micro_f1")
ORDER = ("tfidf", "encoder", "teacher", "base-", "sft-", "sft+grpo-")


def _rank(name: str) -> tuple[int, str]:
    return next((i for i, p in enumerate(ORDER) if name.startswith(p)), len(ORDER)), name


def collect(root: str) -> dict[str, dict[str, Any]]:
    """model name -> metrics, from every report JSON under `<root>/reports`."""
    fs, path = storage.resolve(storage.join(root, "reports"))
    import pyarrow.fs as pafs

    rows = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.extension == "json" and not info.base_name.startswith("_"):
            with fs.open_input_stream(info.path, compression=None) as f:
                data = json.loads(f.read().decode())
            if isinstance(data, dict) and "metrics" in data:
                rows[data.get("model", info.base_name[:-5])] = data["metrics"]
    return dict(sorted(rows.items(), key=lambda kv: _rank(kv[0])))


def grpo_history(root: str) -> list[dict[str, Any]]:
    p = storage.join(root, "checkpoints", "grpo", "metrics.jsonl")
    if not storage.exists(p):
        return []
    fs, path = storage.resolve(p)
    with fs.open_input_stream(path, compression=None) as f:
        return [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]


def markdown(root: str) -> str:
    rows = collect(root)
    lines = [
        "# icdray results",
        "",
        "Test split; sample-F1 is the prototype's metric. LLM rows may cover fewer admissions (column n).",
        "",
        metrics.format_table(rows, COLUMNS)
        if rows
        else "(no reports yet: run `icdray evaluate` or `icdray pipeline`)",
    ]
    history = grpo_history(root)
    if history:
        first, last = history[0], history[-1]
        vals = [m for m in history if "val_sample_f1" in m]
        lines += [
            "",
            f"GRPO: {len(history)} steps, reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}"
            + (
                f", validation sample-F1 {vals[0]['val_sample_f1']:.3f} -> {vals[-1]['val_sample_f1']:.3f}"
                if vals
                else ""
            )
            + ".",
        ]
    lines += ["", "![sample-F1 per model](sample_f1.png)"]
    if history:
        lines += ["", "![GRPO curves](grpo_curves.png)"]
    return "\n".join(lines) + "\n"


def plots(root: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = collect(root)
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
        names = list(rows)[::-1]
        ax.barh(names, [rows[n].get("sample_f1", 0.0) for n in names], color="#457b9d")
        ax.set_xlabel("sample-F1 (test)")
        ax.set_xlim(0, 1)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sample_f1.png"), dpi=120)
        plt.close(fig)
        made.append("sample_f1.png")
    history = grpo_history(root)
    if history:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [m["step"] for m in history]
        ax.plot(steps, [m["reward_mean"] for m in history], marker="o", label="reward (mean)")
        if "reward_code_f1" in history[0]:
            ax.plot(
                steps, [m.get("reward_code_f1", 0.0) for m in history], marker=".", label="code F1 reward"
            )
        vals = [m for m in history if "val_sample_f1" in m]
        if vals:
            ax.plot(
                [m["step"] for m in vals],
                [m["val_sample_f1"] for m in vals],
                marker="s",
                label="val sample-F1",
            )
        ax.set_xlabel("GRPO step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "grpo_curves.png"), dpi=120)
        plt.close(fig)
        made.append("grpo_curves.png")
    return made


def write(root: str) -> str:
    """Write results.md and the PNGs to `<root>/reports/`; returns that folder."""
    import pyarrow.fs as pafs

    out = storage.join(root, "reports")
    with tempfile.TemporaryDirectory() as tmp:
        names = plots(root, tmp)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown(root))
        fs, path = storage.resolve(out)
        fs.create_dir(path, recursive=True)
        for name in ["results.md", *names]:
            pafs.copy_files(os.path.join(tmp, name), f"{path}/{name}", destination_filesystem=fs)
    return out
