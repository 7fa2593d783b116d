"""The results report: rows in pipeline order, results.json's contract, paired comparisons, the plots."""

import json

import pytest

from icdray import metrics, report, results, storage

HADM = [1, 2, 3, 4]
GOLD = [["I10", "E78.5"], ["N17.9"], ["E11.9", "I10"], ["J44.9"]]


def _save(root: str, model: str, role: str, preds, constrained=None) -> dict:
    row = results.make_row(model, role, "top-50", HADM, preds, GOLD, constrained=constrained)
    results.save_row(root, row)
    return row


def test_report_rows_comparisons_and_plots(tmp_path):
    root = str(tmp_path)
    _save(root, "tfidf-logreg", "baseline", [["I10"], ["N17.9"], ["I10"], ["J44.9"]])
    _save(root, "frequency-prior", "prior", [["I10"]] * 4)
    base = _save(root, "base-x", "base", [["Z99.9"]] * 4, constrained=True)
    _save(root, "base-x-free", "base", [[]] * 4, constrained=False)
    sft = _save(root, "sft-x", "sft", [["I10"], ["N17.9"], ["E11.9"], ["R05"]], constrained=True)
    _save(root, "sft+grpo-x", "grpo", [["I10", "E78.5"], ["N17.9"], ["E11.9"], ["R05"]], constrained=True)
    lines = [{"step": s, "reward_mean": 0.1 * s, "val_sample_f1": 0.05 * s} for s in (1, 2, 3)]
    storage.write_text(
        storage.join(root, "checkpoints/grpo/metrics.jsonl"), "".join(json.dumps(x) + "\n" for x in lines)
    )
    storage.write_text(storage.join(root, "checkpoints/sft/metrics.jsonl"), '{"step": 1, "loss": 2.0}\n')
    out = report.write(root)
    text = (tmp_path / "reports" / "results.md").read_text()
    order = [
        text.index(f"| {n} |")
        for n in ("frequency-prior", "tfidf-logreg", "base-x", "base-x-free", "sft-x", "sft+grpo-x")
    ]
    assert order == sorted(
        order
    )  # pipeline order: prior, baselines, base (constrained, then free), sft, grpo
    assert "reward 0.100 -> 0.300" in text and "validation sample-F1 0.050 -> 0.150" in text
    # with the validation gate's figures the line says which step's weights the GRPO rows score
    gate = {"kept_step": 0, "val_sample_f1_by_step": {"0": 0.2, "3": 0.15}}
    storage.write_json(storage.join(root, "checkpoints/grpo/icdray_grpo.json"), gate)
    report.write(root)
    text = (tmp_path / "reports" / "results.md").read_text()
    assert (
        "validation sample-F1 step 0 0.200, step 3 0.150 (step 0 = the SFT model); kept step 0: no GRPO"
        in text
    )
    (tmp_path / "checkpoints/grpo/icdray_grpo.json").unlink()

    data = json.loads((tmp_path / "reports" / "results.json").read_text())
    keys = {
        "model",
        "role",
        "label_space",
        "n",
        "sample_f1",
        "sample_f1_ci95",
        "micro_f1",
        "macro_f1",
        "invalid_rate",
        "evidence_found_rate",
        "format_ok_rate",
        "constrained",
    }
    assert all(keys <= set(r) and "per_admission" not in r for r in data["rows"])
    assert {r["role"] for r in data["rows"]} == {"prior", "baseline", "base", "sft", "grpo"}
    comps = {(c["a"], c["b"]): c for c in data["comparisons"]}
    c = comps[("base-x", "sft-x")]  # constrained rows are compared, never the free ones
    want = (
        sum(metrics.prf(p, g)[2] for p, g in zip([["I10"], ["N17.9"], ["E11.9"], ["R05"]], GOLD, strict=True))
        / 4
    )
    assert c["delta_sample_f1"] == pytest.approx(want - base["sample_f1"]) and c["n"] == 4
    assert c["ci95"][0] <= c["delta_sample_f1"] <= c["ci95"][1]
    assert comps[("sft-x", "sft+grpo-x")]["delta_sample_f1"] == pytest.approx(
        metrics.prf(["I10", "E78.5"], GOLD[0])[2] / 4 - sft["per_admission"]["1"] / 4
    )
    assert ("frequency-prior", "sft+grpo-x") in comps and ("tfidf-logreg", "sft+grpo-x") in comps
    for png in ("sample_f1.png", "grpo_curves.png", "sft_loss.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert out.endswith("reports")


def test_a_rule_row_is_compared_with_the_answers_it_filters_and_the_prior(tmp_path):
    root = str(tmp_path)
    _save(root, "frequency-prior", "prior", [["I10"]] * 4)
    _save(root, "sft-x", "sft", [["I10"]] * 4, constrained=True)
    _save(
        root, "sft+grpo-x", "grpo", [["I10", "R05"], ["N17.9", "R05"], ["E11.9"], ["J44.9"]], constrained=True
    )
    cut = results.make_row(
        "sft+grpo-x-supported",
        "grpo",
        "top-50",
        HADM,
        [["I10"], ["N17.9"], ["E11.9"], ["J44.9"]],
        GOLD,
        constrained=True,
    )
    cut["rule_of"] = "sft+grpo-x"
    results.save_row(root, cut)
    comps = {(c["a"], c["b"]): c for c in results.comparisons(results.collect(root))}
    assert ("sft-x", "sft+grpo-x") in comps  # the role pairs still use the uncut row
    assert ("sft-x", "sft+grpo-x-supported") not in comps
    assert comps[("sft+grpo-x", "sft+grpo-x-supported")]["delta_sample_f1"] > 0
    assert ("frequency-prior", "sft+grpo-x-supported") in comps


def test_rows_of_different_label_spaces_are_not_compared(tmp_path):
    root = str(tmp_path)
    _save(root, "base-x", "base", [["I10"]] * 4, constrained=True)
    row = results.make_row("sft-x", "sft", "full", HADM, [["I10"]] * 4, GOLD, constrained=True)
    results.save_row(root, row)
    assert results.comparisons(results.collect(root)) == []


def test_evidence_and_format_rates():
    from icdray import prompts

    answers = [
        prompts.parse_answer(
            prompts.render_answer("r", [prompts.CodeItem("I10", "HTN"), prompts.CodeItem("E78.5", "made up")])
        ),
        prompts.parse_answer("no answer at all"),
    ]
    row = results.make_row(
        "m",
        "sft",
        "full",
        [1, 2],
        [a.codes for a in answers],
        [["I10"], ["I10"]],
        answers=answers,
        notes=["pt with HTN", "pt with HTN"],
    )
    assert row["format_ok_rate"] == 0.5 and row["evidence_found_rate"] == 0.5
