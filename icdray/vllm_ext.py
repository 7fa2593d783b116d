"""vLLM plug-ins icdray installs in its engines. Imported only inside an engine process (it imports vllm).

`AnswerGuards`: a V1 logits processor that applies icdray's per-request guards to every request whose
`SamplingParams.extra_args` ask for them:
- `{"icdray_codes": key}`: `grammar.RepeatGuard`, no code written twice. The key names the label space:
  "billable" (every billable ICD-10-CM code) or a comma-joined list of codes;
- `{"icdray_quotes": True}`: `grammar.QuoteGuard`, every evidence quote copied from the note, which it
  reads from the request's own prompt (`grammar.note_of`).
Banning tokens never leaves a row without a legal token: if the guards would ban every token the grammar
allows, they ban none.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from icdray import chat, codes, grammar


@functools.cache
def _pieces(tokenizer_path: str, vocab_size: int) -> tuple[str, ...]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return chat.token_pieces(tok, vocab_size)


@functools.cache
def guard_for(tokenizer_path: str, vocab_size: int, key: str) -> grammar.RepeatGuard:
    space = codes.billable_codes() if key == "billable" else key.split(",")
    return grammar.RepeatGuard(space, _pieces(tokenizer_path, vocab_size))


@functools.cache
def quote_guard_for(tokenizer_path: str, vocab_size: int) -> grammar.QuoteGuard:
    return grammar.QuoteGuard(_pieces(tokenizer_path, vocab_size))


def restrict(logits: torch.Tensor, allowed: list[int] | None, banned: list[int]) -> torch.Tensor:
    """Mask one row of logits to `allowed` (None: no limit) minus `banned`, unless no legal token would be
    left (then the row is left as the grammar made it)."""
    if allowed is None and not banned:
        return logits
    logits[~grammar.guarded(torch.isfinite(logits), allowed, banned)] = float("-inf")
    return logits


class _PerRequest:
    """Running answer text of one request (tokens decoded one by one, as the guards expect)."""

    def __init__(self, guards: grammar.AnswerGuards) -> None:
        self.guards, self.seen, self.text, self.note = guards, 0, "", None

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) > self.seen:
            self.text += "".join(self.guards.pieces[t] for t in output_ids[self.seen :])
            self.seen = len(output_ids)
        if self.note is None:
            self.note = self.guards.note(prompt_ids) if self.guards.quotes is not None else ""
        return restrict(logits, *self.guards.rule(self.note, self.text))


class AnswerGuards(AdapterLogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        mc = vllm_config.model_config
        self.tokenizer_path = mc.tokenizer
        self.vocab_size = mc.get_vocab_size()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        args = params.extra_args or {}
        key, quotes = args.get("icdray_codes"), bool(args.get("icdray_quotes"))
        if not key and not quotes:
            return None
        path, vocab = self.tokenizer_path, self.vocab_size
        return _PerRequest(
            grammar.AnswerGuards(
                _pieces(path, vocab),
                guard_for(path, vocab, key) if key else None,
                quote_guard_for(path, vocab) if quotes else None,
            )
        )
