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


def test_a_gate_that_kept_the_sft_model_reuses_its_rows_only_for_identical_weights(tmp_path):
    """The SFT+GRPO rows are the SFT rows when the gate exported the SFT weights unchanged; one changed
    weight, or a gate that kept a later step, and the rows are decoded again."""
    import torch

    from icdray import models, pipeline
    from icdray.config import load_config
    from icdray.evaluate import reuse
    from icdray.grpo.learner import _write_hf
    from icdray.layout import Layout

    cfg = load_config(None, [f"storage={tmp_path}", "sft.model=tiny"])
    where = Layout(cfg.storage)
    _write_hf(where.checkpoint("sft"), models.resolve("tiny"))
    _write_hf(where.checkpoint("grpo"), where.checkpoint("sft"))  # the gate's copy_model: a re-save
    storage.write_json(storage.join(where.checkpoint("grpo"), "icdray_grpo.json"), {"kept_step": 0})
    sft_row, grpo_row = pipeline.trained_models(cfg)[1][2], pipeline.trained_models(cfg)[2][2]
    sft = results.make_row(sft_row, "sft", "top-50", HADM, [["I10"]] * 4, GOLD, constrained=True)
    sft["config"] = {"limit": cfg.evaluate.limit}
    results.save_row(cfg.storage, sft)
    storage.write_text(where.predictions(sft_row), '{"hadm_id": 1}\n')
    assert pipeline._kept_start(cfg)

    rows = reuse(cfg, sft_row, grpo_row, "grpo", where.checkpoint("grpo"), "same weights")
    assert [r["model"] for r in rows] == [grpo_row]  # no free row was saved, none is made up
    again = storage.read_json(where.report(grpo_row))
    assert again["role"] == "grpo" and again["reused_from"] == sft_row
    assert again["sample_f1"] == sft["sample_f1"] and again["per_admission"] == sft["per_admission"]
    assert storage.read_text(where.predictions(grpo_row)) == '{"hadm_id": 1}\n'

    storage.write_json(storage.join(where.checkpoint("grpo"), "icdray_grpo.json"), {"kept_step": 4})
    assert not pipeline._kept_start(cfg)
    storage.write_json(storage.join(where.checkpoint("grpo"), "icdray_grpo.json"), {"kept_step": 0})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(where.checkpoint("grpo"))
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    model.save_pretrained(where.checkpoint("grpo"))
    assert not pipeline._kept_start(cfg)
    with pytest.raises(FileNotFoundError, match="evaluate it first"):
        reuse(cfg, "no-such-row", grpo_row, "grpo", "", "")
