"""The decision rule: codes that cite the note and clear a cut tuned for sample-F1; never an empty answer."""

import pytest

from icdray import confidence, metrics


def test_apply_cut_keeps_cited_confident_codes_and_never_nothing():
    answer = [("I10", 0.9, True), ("R05", 0.2, True), ("E78.5", 0.6, True), ("K21.9", 0.95, False)]
    assert confidence.apply_cut(answer, 0.5) == ["I10", "E78.5"]  # answer order; K21.9 cites nothing
    assert confidence.apply_cut(answer, 0.0) == ["I10", "R05", "E78.5"]
    assert confidence.apply_cut(answer, 0.99) == ["I10"]  # the best code citing the note
    assert confidence.apply_cut([("K21.9", 0.4, False), ("R05", 0.7, False)], 0.5) == ["R05"]
    assert confidence.apply_cut([], 0.5) == []


def test_tune_cut_picks_the_cut_with_the_best_sample_f1_by_hand():
    answers = [
        [("I10", 0.9, True), ("R05", 0.3, True), ("E78.5", 0.8, True), ("K21.9", 0.9, False)],
        [("N17.9", 0.7, True), ("Z99.9", 0.2, True)],  # Z99.9 is wrong
        [("J44.9", 0.4, True), ("E11.9", 0.25, True)],  # both right, both unsure
    ]
    golds = [{"I10", "E78.5"}, {"N17.9"}, {"J44.9", "E11.9"}]
    cut, f1, written = confidence.tune_cut(answers, golds)
    # as written: 2/3, 2/3, 1; K21.9 dropped (no quote): 0.8; a cut in (0.2, 0.25] also drops Z99.9: 1;
    # at 0.3 E11.9 goes too
    assert written == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)
    assert cut == 0.25 and f1 == pytest.approx((0.8 + 1.0 + 1.0) / 3)
    preds = [confidence.apply_cut(a, cut) for a in answers]
    assert sum(metrics.per_admission_f1(preds, golds)) / 3 == pytest.approx(f1)


def test_tune_cut_keeps_every_cited_code_when_no_cut_helps():
    answers = [[("I10", 0.9, True), ("E78.5", 0.1, True)]]
    assert confidence.tune_cut(answers, [{"I10", "E78.5"}]) == (0.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        confidence.tune_cut(answers, [])


def test_tune_cut_tries_at_most_max_cuts_values():
    answers = [[(f"C{i}", i / 1000, True) for i in range(1, 1000)]]
    cut, _, _ = confidence.tune_cut(answers, [{"C999"}], max_cuts=10)
    assert cut == pytest.approx(0.999)  # the top score is always among the tried cuts
