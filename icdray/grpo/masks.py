"""The sampler's token mask, rebuilt along each sampled completion: mask-consistent learner log-probs.

Under constrained decoding vLLM samples from the masked, renormalised distribution
`softmax(logits + grammar mask)` and reports its log-probs (12-28 % of the tokens are forced, log-prob
0, and the rest differ from the raw model's by up to 13 nats). A learner that scores the same tokens
without the mask optimises another objective. `MaskReplay` walks each completion through an xgrammar
matcher compiled from the same grammar string the sampler used (and the same stop tokens), applies the
same guards as the sampler's `vllm_ext.AnswerGuards` (no repeated code; quotes from the note, read
from the completion's own prompt), and returns a boolean (T, V) mask per completion; `packing.token_logprobs`
applies it. A token with one legal choice gets log-prob 0 and no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from icdray.grammar import AnswerConstraint, AnswerGuards, QuoteGuard, RepeatGuard, guarded


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's (T, ceil(V/32)) int32 bitmask -> (T, V) bool (bit j of word w = token 32w + j)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (T, W, 32)
    return bits.bool().reshape(bitmask.shape[0], -1)[:, :vocab_size]


class MaskReplay:
    def __init__(
        self,
        tokenizer: object,
        constraint: AnswerConstraint,
        vocab_size: int,
        stop_ids: Sequence[int],
        no_repeat_codes: bool = True,
        note_quotes: bool = False,
    ) -> None:
        import xgrammar as xgr

        from icdray import chat, codes

        self.xgr, self.vocab_size, self.stop_ids = xgr, vocab_size, list(stop_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiled = xgr.GrammarCompiler(info, max_threads=2).compile_grammar(constraint.grammar)
        pieces = chat.token_pieces(tokenizer, vocab_size)
        repeat = None
        if no_repeat_codes:
            space = (
                codes.billable_codes()
                if constraint.code_key == "billable"
                else constraint.code_key.split(",")
            )
            repeat = RepeatGuard(space, pieces)
        quotes = QuoteGuard(pieces) if note_quotes else None
        self.guards = AnswerGuards(pieces, repeat, quotes) if repeat or quotes else None

    def allowed(self, completion: Sequence[int], prompt: Sequence[int] = ()) -> tuple[torch.Tensor, bool]:
        """(T, V) bool: the tokens the sampler could draw at each position; and whether the grammar
        accepted every sampled token (False means the completion was not drawn under this constraint).
        `prompt`: the completion's prompt ids, where the quote guard reads the note."""
        xgr = self.xgr
        t = len(completion)
        matcher = xgr.GrammarMatcher(self.compiled, override_stop_tokens=self.stop_ids)
        bitmask = xgr.allocate_token_bitmask(max(1, t), self.vocab_size)
        consistent = True
        for j, tok in enumerate(completion):
            matcher.fill_next_token_bitmask(bitmask, j)
            if not matcher.accept_token(int(tok)):
                consistent = False
                bitmask[j + 1 :] = -1  # the rest: unconstrained
                break
        out = unpack_bitmask(bitmask[:t], self.vocab_size)
        if self.guards is not None and consistent:
            note, text = self.guards.note(prompt), ""
            for j, tok in enumerate(completion):
                allowed, banned = self.guards.rule(note, text)
                if allowed is not None or banned:
                    out[j] = guarded(out[j], allowed, banned)
                text += self.guards.pieces[int(tok)]
        return out, consistent
