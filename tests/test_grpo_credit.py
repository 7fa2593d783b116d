"""Item credit: items found in a completion's tokens, and their rewards laid on those tokens."""

import pytest

from icdray import models, prompts
from icdray.grpo import credit


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))


ANSWER = prompts.render_answer(
    "sepsis from pneumonia",
    [
        prompts.CodeItem("A41.9", "sepsis"),
        prompts.CodeItem("J18.9", "pneumonia"),
        prompts.CodeItem("I10", "HTN"),
    ],
)


def test_item_spans_are_the_items_of_the_answer_block():
    spans = prompts.item_spans(ANSWER)
    assert [code for *_, code in spans] == ["A41.9", "J18.9", "I10"]
    assert [ANSWER[lo:hi] for lo, hi, _ in spans][1] == '{"evidence": "pneumonia", "code": "J18.9"}'
    # items before the (last) answer tag are not the answer's
    assert [c for *_, c in prompts.item_spans('{"evidence": "x", "code": "E11.9"} ' + ANSWER)] == [
        "A41.9",
        "J18.9",
        "I10",
    ]
    assert prompts.item_spans("no answer at all") == [] and prompts.item_spans(None) == []
    truncated = ANSWER[: ANSWER.index('{"evidence": "HTN"') + 10]
    assert [c for *_, c in prompts.item_spans(truncated)] == ["A41.9", "J18.9"]  # a cut item is no item


def test_token_spans_cover_each_item_and_the_separator_that_chose_it(tok):
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    spans, found = credit.token_spans(tok, ids)
    assert found == ["A41.9", "J18.9", "I10"]
    pieces = [tok.decode(ids[lo:hi]) for lo, hi in spans]
    for piece, code, quote in zip(pieces, found, ["sepsis", "pneumonia", "HTN"], strict=True):
        assert code in piece and quote in piece
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]  # disjoint, in order
    assert pieces[1].startswith('"},') and pieces[2].startswith('"},')  # the decision to go on
    closing = tok.decode(ids[spans[2][1] :])
    assert closing.startswith('"}') and "]" in closing  # the token that stopped is no item's
    assert "<reasoning>" not in "".join(pieces)


def test_item_shares_add_up_to_the_answers_f1():
    gold = ["A41.9", "J18.9", "E11.9"]
    answer = ["A41.9", "I10", "J18.9", "A41.9"]
    shares = credit.item_shares(answer, gold)
    assert sum(shares) == pytest.approx(2 * 2 / (3 + 3))  # F1 of {A41.9, I10, J18.9} against gold
    assert shares[0] > 0 and shares[1] < 0 and shares[2] > 0  # gold codes gain, a wrong one costs
    assert shares[3] == 0.0  # a repeated code changes nothing


def test_group_token_advantages_push_gold_items_up_and_wrong_ones_down(tok):
    good = tok(ANSWER, add_special_tokens=False)["input_ids"]
    gold = ["A41.9", "J18.9"]  # I10 is wrong
    adv = credit.group_token_advantages(tok, [good, good], gold, [0.0, 0.0], weight=1.0)
    spans, _ = credit.token_spans(tok, good)
    first, wrong = adv[0][spans[0][0]], adv[0][spans[2][0]]
    assert (
        first > 0 > wrong
    )  # the gold item's tokens are raised, the wrong one's (and going on to it) lowered
    assert adv[0][0] == 0.0  # reasoning tokens keep the answer's advantage
    assert adv[0] == adv[1]


def test_the_learner_reads_per_token_advantages_in_layout_order():
    from icdray.grpo.learner import Experience, _advantages

    rows = [
        Experience([1, 2], [5, 6, 7], [0.0] * 3, 0.5),
        Experience([1, 2], [5, 6], [0.0] * 2, -1.0, [-1.0, 2.0]),
    ]
    got = _advantages(rows, [1, 0], 4)  # the layout put row 1 first
    assert got.tolist() == [[-1.0, 2.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]
    assert _advantages([], [0, 1], 3).abs().sum() == 0  # a padding pass
