"""The results report: every scored model in one table, the paired comparisons, and the plots.

reports/<model>.json (prior, baselines, teacher, base, SFT, SFT+GRPO; constrained and free rows)
    -> reports/results.md and reports/results.json (results.py's contract)
checkpoints/grpo/metrics.jsonl -> reports/grpo_curves.png (reward and validation F1 per step)
checkpoints/sft/metrics.jsonl  -> reports/sft_loss.png
-> reports/sample_f1.png (sample-F1 per model with its 95% interval)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from icdray import layout, results, storage


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p, compression=None) as f:
        return [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]


def grpo_history(root: str) -> list[dict[str, Any]]:
    return _jsonl(layout.Layout(root).metrics("grpo"))


def grpo_gate(root: str) -> dict[str, Any] | None:
    """The validation gate's figures (`grpo.keep_best`): {"scores": {step: val sample-F1}, "kept_step"}."""
    path = storage.join(layout.Layout(root).checkpoint("grpo"), "icdray_grpo.json")
    meta = storage.read_json(path) if storage.exists(path) else {}
    scores = meta.get("val_sample_f1_by_step") or {}
    if not scores:
        return None
    return {"scores": {int(k): float(v) for k, v in scores.items()}, "kept_step": meta["kept_step"]}


def sft_history(root: str) -> list[dict[str, Any]]:
    return _jsonl(layout.Layout(root).metrics("sft"))


def calibration(root: str) -> dict[str, Any] | None:
    path = storage.join(layout.Layout(root).reports, "calibration.json")
    return storage.read_json(path) if storage.exists(path) else None


def results_json(root: str) -> dict[str, Any]:
    rows = results.collect(root)
    return {"rows": [results.public(r) for r in rows], "comparisons": results.comparisons(rows)}


def markdown(root: str) -> str:
    rows = results.collect(root)
    prep_path = layout.Layout(root).prepare_report
    prep = storage.read_json(prep_path) if storage.exists(prep_path) else {}
    leak = "kept" if prep.get("keep_discharge_diagnosis") else "removed"
    lines = [
        "# icdray results",
        "",
        f"Test split; label space {prep.get('label_space', 'full')}; the discharge diagnosis section {leak}. "
        "sample-F1 is the prototype's metric; its 95% interval is a bootstrap over admissions. "
        "Constrained rows decode under the answer grammar (they measure coding); free rows do not "
        "(they measure the format).",
        "",
        results.table(rows) if rows else "(no reports yet: run `icdray evaluate` or `icdray pipeline`)",
    ]
    comps = results.comparisons(rows)
    if comps:
        lines += ["", "Paired differences in sample-F1 (b - a, same admissions, 95% bootstrap interval):", ""]
        lines += ["| a | b | n | delta | 95% interval |", "|---|---|---:|---:|---:|"]
        lines += [
            f"| {c['a']} | {c['b']} | {c['n']} | {c['delta_sample_f1']:+.3f} | "
            f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] |"
            for c in comps
        ]
    history = grpo_history(root)
    if history:
        first, last = history[0], history[-1]
        vals = [m for m in history if "val_sample_f1" in m]
        updates = sum("loss" in m for m in history)
        gate = grpo_gate(root)
        if gate:  # grpo.keep_best: the start model was scored too, and one step's weights were kept
            by_step = ", ".join(f"step {k} {v:.3f}" for k, v in sorted(gate["scores"].items()))
            kept = gate["kept_step"]
            val = f", validation sample-F1 {by_step} (step 0 = the SFT model); kept step {kept}" + (
                ": no GRPO step beat the SFT model, so the SFT+GRPO rows score its weights (the SFT rows' answers,"
                " not decoded again: the weights are bit-identical)"
                if kept == 0
                else ""
            )
        elif vals:
            val = f", validation sample-F1 {vals[0]['val_sample_f1']:.3f} -> {vals[-1]['val_sample_f1']:.3f}"
        else:
            val = ""
        lines += [
            "",
            f"GRPO: {len(history)} steps ({updates} with an update), reward {first['reward_mean']:.3f} -> "
            f"{last['reward_mean']:.3f}{val}.",
        ]
    cal = calibration(root)
    if cal:
        c = cal["calibration"]
        auto = (
            f"At the auto-eligibility threshold {c['threshold']:.2f} (target precision {c['target_precision']:.2f}): "
            f"precision {c['precision_at_threshold']:.3f}, coverage {c['coverage_at_threshold']:.3f} of the codes."
            if c["coverage_at_threshold"] > 0
            else f"No confidence reaches precision {c['target_precision']:.2f} on validation: no chart is auto-eligible."
        )
        lines += [
            "",
            f"Confidence ({cal['model']}): isotonic calibration on {cal['notes']} validation notes ({c['n_codes']} codes). "
            + auto,
        ]
        rule = cal.get("rule")
        if rule:
            lines += [
                "",
                f"Decision rule ({cal['model']}-supported): a code stays when its quote is in the note and its "
                f"raw confidence is at least {rule['cut']:.3f}, the cut with the best sample-F1 on the same validation "
                f"notes ({rule['val_sample_f1_as_written']:.3f} as written, {rule['val_sample_f1']:.3f} with the rule); "
                "an answer keeps at least one code.",
            ]
        lines += ["", "![reliability](reliability.png)"]
    lines += ["", "![sample-F1 per model](sample_f1.png)"]
    if sft_history(root):
        lines += ["", "![SFT loss](sft_loss.png)"]
    if history:
        lines += ["", "![GRPO curves](grpo_curves.png)"]
    return "\n".join(lines) + "\n"


def plots(root: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = results.collect(root)
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * len(rows)))
        names = [r["model"] for r in rows][::-1]
        f1 = [r["sample_f1"] for r in rows][::-1]
        ci = [r.get("sample_f1_ci95") or [v, v] for r, v in zip(rows[::-1], f1, strict=True)]
        err = [
            [v - c[0] for v, c in zip(f1, ci, strict=True)],
            [c[1] - v for v, c in zip(f1, ci, strict=True)],
        ]
        ax.barh(names, f1, xerr=err, color="#457b9d", capsize=3)
        ax.set_xlabel("sample-F1 (test), 95% bootstrap interval")
        ax.set_xlim(0, 1)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sample_f1.png"), dpi=120)
        plt.close(fig)
        made.append("sample_f1.png")
    sft = sft_history(root)
    if sft:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot([m["step"] for m in sft], [m["loss"] for m in sft], label="train loss")
        vals = [m for m in sft if "val_loss" in m]
        if vals:
            ax.plot([m["step"] for m in vals], [m["val_loss"] for m in vals], marker="s", label="val loss")
        ax.set_xlabel("SFT step")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sft_loss.png"), dpi=120)
        plt.close(fig)
        made.append("sft_loss.png")
    cal = calibration(root)
    if cal and cal["calibration"]["bins"]:
        bins = cal["calibration"]["bins"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", color="#457b9d")
        for b in bins:
            ax.annotate(
                str(b["n"]),
                (b["predicted"], b["observed"]),
                fontsize=7,
                xytext=(3, -9),
                textcoords="offset points",
            )
        ax.axvline(cal["calibration"]["threshold"], color="#e76f51", lw=1)
        ax.set_xlabel("calibrated confidence")
        ax.set_ylabel("observed precision (validation)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "reliability.png"), dpi=120)
        plt.close(fig)
        made.append("reliability.png")
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
    """Write results.md, results.json and the PNGs to `<root>/reports/`; returns that folder."""
    import pyarrow.fs as pafs

    out = layout.Layout(root).reports
    with tempfile.TemporaryDirectory() as tmp:
        names = plots(root, tmp)
        with open(os.path.join(tmp, "results.md"), "w") as f:
            f.write(markdown(root))
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results_json(root), f, indent=2, default=str)
        fs, path = storage.resolve(out)
        fs.create_dir(path, recursive=True)
        for name in ["results.md", "results.json", *names]:
            pafs.copy_files(os.path.join(tmp, name), f"{path}/{name}", destination_filesystem=fs)
    return out
