"""Coders' corrections flow back into training: feedback store -> `icdray feedback export` ->
`prepare.extra_train` -> the train split (SFT targets via distill, GRPO prompts)."""

from __future__ import annotations

from icdray import feedback, layout, prepare
from icdray.cli import main
from icdray.config import PrepareConfig

NOTE = "Chief Complaint: dyspnea\nHistory of Present Illness: acute on chronic systolic heart failure."


def test_reviewed_charts_become_training_rows(ray_session, demo_root, tmp_path, capsys):
    root = str(tmp_path / "store")
    store = feedback.FeedbackStore(feedback.default_url(root))
    codes = [{"code": "I50.23"}, {"code": "I10"}, {"code": "E78.5"}]
    store.record_request("chart-1", NOTE, ["furosemide"], codes, model="sft+grpo")
    store.record_request("chart-2", NOTE, [], [{"code": "I10"}], model="sft+grpo")  # never reviewed
    store.record("chart-1", "I50.23", "accept", "ana")
    store.record("chart-1", "I10", "edit", "ana", new_code="I11.0")  # hypertensive heart disease
    store.record("chart-1", "E78.5", "reject", "ana")
    store.record("chart-1", "J96.01", "add", "ana")
    out = str(tmp_path / "feedback.parquet")
    assert main(["feedback", "export", "--storage", root, "--out", out]) == 0
    assert "1 reviewed chart" in capsys.readouterr().out

    prepare.run(PrepareConfig(top_k_codes=0, extra_train=(out,)), root, demo_root)
    train = layout.read_split(root, "train", ["note_id", "codes", "note"]).to_pylist()
    mine = [r for r in train if r["note_id"] == "feedback-chart-1"]
    assert len(mine) == 1 and mine[0]["codes"] == ["I50.23", "I11.0", "J96.01"]  # corrected, order kept
    assert not any(r["note_id"] == "feedback-chart-2" for r in train)  # unreviewed charts stay out
