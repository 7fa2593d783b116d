"""Every constrained answer closes inside its token budget, even from a model that writes the maximum
everywhere (issue: served answers were cut off before their codes when the bounds did not fit the budget)."""

from __future__ import annotations

import pytest
import torch

from icdray import chat, grammar, models, prompts
from icdray.grpo.masks import unpack_bitmask

CLOSERS = set('"]}')


def _adversary_tokens(tok, constraint: grammar.AnswerConstraint, limit: int) -> tuple[int, str]:
    """Decode under the grammar choosing, at every step, the legal token that postpones the end longest:
    never a stop token or a closing quote/bracket while anything else is legal, and the fewest characters
    per token (so every bound is filled one character at a time). Returns (tokens written, text)."""
    import xgrammar as xgr

    vocab = len(tok)
    stops = chat.eos_ids(tok)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    matcher = xgr.GrammarMatcher(
        xgr.GrammarCompiler(info, max_threads=2).compile_grammar(constraint.grammar),
        override_stop_tokens=stops,
    )
    pieces = [tok.decode([i]) for i in range(vocab)]
    cost = torch.tensor([len(p) if p else 10**6 for p in pieces], dtype=torch.float64)
    closing = torch.tensor([any(c in CLOSERS for c in p) for p in pieces])
    is_stop = torch.zeros(vocab, dtype=torch.bool)
    is_stop[stops] = True
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    text, n = "", 0
    while not matcher.is_terminated() and n <= limit:
        matcher.fill_next_token_bitmask(bitmask, 0)
        legal = unpack_bitmask(bitmask, vocab)[0]
        score = cost.clone()
        score[closing] += 1e3  # close only when nothing else is legal
        score[is_stop] += 1e6
        score[~legal] = float("inf")
        t = int(score.argmin())
        assert matcher.accept_token(t)
        n += 1
        if t not in stops:
            text += pieces[t]
    return n, text


@pytest.mark.parametrize(
    "bounds",
    [grammar.Bounds(40, 12, 3), grammar.Bounds(120, 40, 14)],
    ids=["small", "demo"],
)
def test_a_model_writing_the_maximum_everywhere_still_closes_inside_the_budget(bounds):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    space = ["I50.23", "J96.01", "E11.22", "N18.30", "I10", "Z79.4", "E78.5", "K21.9", "F32.A", "D64.9",
             "J44.1", "I48.91", "N39.0", "A41.9", "E87.1", "Z95.5"]  # fmt: skip
    constraint = grammar.constraint(space, bounds)
    n, text = _adversary_tokens(tok, constraint, constraint.max_tokens + 50)
    assert n <= constraint.max_tokens, f"{n} tokens > budget {constraint.max_tokens}"
    answer = prompts.parse_answer(text)
    # it did write the maximum: every item (the grammar alone allows repeats; serving's guard bans them),
    # the longest reasoning and the longest evidence
    assert answer.ok and text.count('"code"') == bounds.max_codes
    assert len(answer.reasoning) == bounds.max_reasoning_chars
    assert all(len(i.evidence) == bounds.max_evidence_chars for i in answer.items)
