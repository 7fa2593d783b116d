"""Item credit: a coding answer's F1, split over its items and laid on their tokens (`grpo.item_credit`).

An answer is a list of items, each an evidence quote then a code, ended by `]`. Outcome-only GRPO gives
every token of an answer the same advantage: inside an answer that scored well a wrong code is pushed up
with the right ones, and a group of G answers carries G numbers for ~10 code choices and ~10 decisions
to go on each. Item credit gives each item its share of the answer's code F1: the F1 gained when it was
written, `F1(items 1..k) - F1(items 1..k-1)` (the shares add up to the answer's F1). A gold code's share
is positive, a wrong or repeated code's negative; measured against stopping before the item (zero), so
it also prices the decision to write one more item, which is F1-optimal only while the next code is
likely enough to be gold. Shares are divided by their standard deviation over the group's items
(`algo.item_advantages`) and added, times `grpo.item_credit`, to the answer's advantage on the tokens
that wrote the item: from the separator that chose to go on (`",` or `, `) to the item's last character
before its closing brace. The token that closes the answer keeps the answer's advantage only.

Tokens are matched to items by character offsets: the completion's token ids are decoded prefix by
prefix (prefixes of a byte-level BPE decode to prefixes of the text), and a token belongs to the item in
whose region its last character falls (`prompts.item_spans` finds the items).
Left out: partial credit for near misses (the hierarchy reward covers them for the whole answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from icdray import metrics, prompts
from icdray.grpo import algo


def item_shares(items: Sequence[str], gold: Sequence[str]) -> list[float]:
    """Each item's share of the answer's code F1: F1 of the first k items minus F1 of the first k - 1."""
    out, before = [], 0.0
    for k in range(1, len(items) + 1):
        f1 = metrics.prf(items[:k], gold)[2]
        out.append(f1 - before)
        before = f1
    return out


def token_spans(tok: Any, token_ids: Sequence[int]) -> tuple[list[tuple[int, int]], list[str]]:
    """([lo, hi) token range, code) of each answer item of a completion given as token ids."""
    ids = list(token_ids)
    opts = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    items = prompts.item_spans(tok.decode(ids, **opts))
    if not items:
        return [], []
    # last[k]: index of the last character token k decoded (-1 for a token that decodes to nothing)
    ends = [len(tok.decode(ids[: k + 1], **opts)) for k in range(len(ids))]
    last = [e - 1 if e > s else -1 for s, e in zip([0, *ends[:-1]], ends, strict=True)]
    spans = []
    for j, (start, end, _) in enumerate(items):
        lo_char = items[j - 1][1] if j else start  # the separator that chose to write this item
        inside = [k for k, c in enumerate(last) if lo_char <= c < end - 1]
        spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return spans, [code for _, _, code in items]


def group_token_advantages(
    tok: Any,
    completions: Sequence[Sequence[int]],
    gold: Sequence[str],
    advantages: Sequence[float],
    weight: float,
) -> list[list[float]]:
    """One group's (G,) answer advantages -> (G, T_i) token advantages with item credit at `weight`."""
    parsed = [token_spans(tok, ids) for ids in completions]
    shares = algo.item_advantages([item_shares(item_codes, gold) for _, item_codes in parsed])
    return [
        algo.token_advantages(float(a), len(ids), spans, item_adv, weight)
        for ids, a, (spans, _), item_adv in zip(completions, advantages, parsed, shares, strict=True)
    ]
