"""Rewards on hand-made answers: perfect, near miss, invalid code, fabricated evidence, malformed."""

import pytest

from icdray import prompts
from icdray.config import RewardConfig
from icdray.grpo import rewards as reward

NOTE = "Ms. ___ with HTN and acute kidney injury, on lisinopril. History of type 2 diabetes on metformin."
GOLD = ["I10", "N17.9", "E11.9"]


def answer(*items):
    return prompts.render_answer("reasoning", [prompts.CodeItem(c, e) for c, e in items])


PERFECT = answer(("I10", "HTN"), ("N17.9", "acute kidney injury"), ("E11.9", "type 2 diabetes"))
NEAR = answer(("I10", "HTN"), ("N17.0", "acute kidney injury"), ("E11.65", "type 2 diabetes"))
INVALID = answer(("I10", "HTN"), ("N17", "acute kidney injury"), ("XYZ.9", "type 2 diabetes"))
FABRICATED = answer(
    ("I10", "severe uncontrolled hypertension"), ("N17.9", "creatinine 9.0"), ("E11.9", "insulin pump")
)
MALFORMED = "I think the patient has HTN and AKI. Codes: I10, N17.9"


def score(completion):
    total, parts = reward.score_batch([completion], [GOLD], [NOTE])
    return total[0], {k: v[0] for k, v in parts.items()}


def test_perfect_answer_gets_everything():
    total, parts = score(PERFECT)
    assert parts == {"format": 1.0, "code_f1": 1.0, "hierarchy": 1.0, "invalid": 0.0, "evidence": 1.0}
    weights = RewardConfig().weights()
    assert total == pytest.approx(sum(v for k, v in weights.items() if k not in ("invalid", "length")))


def test_near_miss_earns_hierarchy_credit_but_not_f1():
    _, parts = score(NEAR)
    assert parts["code_f1"] == pytest.approx(1 / 3)
    assert parts["hierarchy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert parts["evidence"] == 1.0 and parts["invalid"] == 0.0


def test_invalid_codes_are_penalised():
    _, parts = score(INVALID)
    assert parts["invalid"] == pytest.approx(-2 / 3)  # N17 (a category) and XYZ.9 are not assignable
    assert parts["format"] == 1.0  # invalid codes are the invalid reward's business, not the format's


def test_fabricated_evidence_is_caught():
    _, parts = score(FABRICATED)
    assert parts["code_f1"] == 1.0 and parts["evidence"] == 0.0


def test_malformed_answer_gets_nothing_and_ranks_last():
    totals, _ = reward.score_batch([PERFECT, NEAR, INVALID, FABRICATED, MALFORMED], [GOLD] * 5, [NOTE] * 5)
    _, parts = score(MALFORMED)
    assert parts["format"] == 0.0 and parts["code_f1"] == 0.0
    assert totals[0] == max(totals) and totals[-1] == min(totals)
    assert totals[1] > totals[2]  # a near miss beats invalid codes


def test_unknown_reward_and_length_penalty():
    with pytest.raises(ValueError, match="unknown reward"):
        reward.score_batch([PERFECT], [GOLD], [NOTE], weights={"bogus": 1.0})
    assert reward.length_reward(["x" * 100, "x" * 300], max_chars=200) == [0.0, -0.5]


def test_edits_reward_penalises_charts_the_edits_would_block():
    clean = answer(("N17.9", "acute kidney injury"), ("I10", "HTN"))
    blocked = answer(("G63", "polyneuropathy"), ("E11.9", "type 2 diabetes"))  # manifestation as principal
    warned = answer(("E11.22", "diabetic CKD"))  # without its N18 partner: a warning
    got = reward.edits_reward([clean, blocked, warned])
    assert got[0] == 0.0 and got[1] <= -1.0 and -1.0 < got[2] < 0.0
    total, parts = reward.score_batch([blocked], [GOLD], [NOTE], weights={"edits": 0.5})
    assert total == [0.5 * parts["edits"][0]]
