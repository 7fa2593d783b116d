"""vLLM plug-ins icdray installs in its engines. Imported only inside an engine process (it imports vllm).

`NoRepeatCodes`: a V1 logits processor that applies `grammar.RepeatGuard` to every request whose
`SamplingParams.extra_args` carry `{"icdray_codes": key}`. The key names the label space: "billable"
(every billable ICD-10-CM code) or a comma-joined list of codes. Banning a token never leaves a row
without a legal token: if the guard would ban every token the grammar allows, it bans none.
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


class _PerRequest:
    """Running answer text of one request (tokens decoded one by one, as the guard expects)."""

    def __init__(self, guard: grammar.RepeatGuard, pieces: tuple[str, ...]) -> None:
        self.guard, self.pieces, self.seen, self.text = guard, pieces, 0, ""

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(output_ids) > self.seen:
            self.text += "".join(self.pieces[t] for t in output_ids[self.seen :])
            self.seen = len(output_ids)
        banned = self.guard.banned(self.text)
        if banned:
            idx = torch.tensor(banned, dtype=torch.long, device=logits.device)
            legal = torch.isfinite(logits)
            legal[idx] = False
            if bool(legal.any()):
                logits[idx] = float("-inf")
        return logits


class NoRepeatCodes(AdapterLogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        mc = vllm_config.model_config
        self.tokenizer_path = mc.tokenizer
        self.vocab_size = mc.get_vocab_size()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        key = (params.extra_args or {}).get("icdray_codes")
        if not key:
            return None
        return _PerRequest(
            guard_for(self.tokenizer_path, self.vocab_size, key),
            _pieces(self.tokenizer_path, self.vocab_size),
        )
