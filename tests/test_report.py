"""The results report: one table over every report JSON, in pipeline order, plus the plots."""

import json

from icdray import report, storage


def test_report_table_and_plots(tmp_path):
    root = str(tmp_path)
    m = {
        "n": 4,
        "sample_f1": 0.1,
        "micro_f1": 0.2,
        "macro_f1": 0.05,
        "hierarchical_f1": 0.3,
        "invalid_rate": 0.0,
    }
    for name, f1 in (("sft+grpo-x", 0.3), ("tfidf-logreg", 0.7), ("base-x", 0.0), ("sft-x", 0.2)):
        storage.write_json(
            storage.join(root, "reports", f"{name}.json"), {"model": name, "metrics": {**m, "sample_f1": f1}}
        )
    lines = [{"step": s, "reward_mean": 0.1 * s, "val_sample_f1": 0.05 * s} for s in (1, 2, 3)]
    storage.write_text(
        storage.join(root, "checkpoints/grpo/metrics.jsonl"), "".join(json.dumps(x) + "\n" for x in lines)
    )
    out = report.write(root)
    text = (tmp_path / "reports" / "results.md").read_text()
    order = [text.index(f"| {n} |") for n in ("tfidf-logreg", "base-x", "sft-x", "sft+grpo-x")]
    assert order == sorted(order)
    assert "| sft+grpo-x | 4 | 0.300 | 0.200 | 0.050 | 0.300 |" in text
    assert "reward 0.100 -> 0.300" in text and "validation sample-F1 0.050 -> 0.150" in text
    for png in ("sample_f1.png", "grpo_curves.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert out.endswith("reports")
