"""Model inputs: (note, medications[, answer]) -> token ids within a budget, for every model family.

The one place that applies chat templates. SFT (prompt + answer, prompt masked), GRPO rollouts and the
learner, evaluation and serving all call `encode_prompt` / `encode_example`, so a prompt is tokenised
the same way wherever it is scored.

Family differences handled here:
- templates with a thinking switch (Qwen3: `enable_thinking`) get it from `InputConfig.thinking`
  (off by default: the answer format has its own `<reasoning>` block);
- a template that rewrites the prompt when an assistant turn follows falls back to prompt + answer + EOS;
- a tokenizer without a pad token pads with EOS (`pad_id`).

A note that does not fit is re-cut the way `prepare` cuts notes (`notes.prepare_note`: low-value
sections first), then hard-truncated from the left as a last resort (the generation prompt stays).
"""

from __future__ import annotations

from typing import Any

from icdray import notes, prompts


def token_ids(encoded: Any) -> list[int]:
    """Token ids from apply_chat_template, whichever shape this transformers version returns."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def token_pieces(tok: Any, vocab_size: int | None = None) -> tuple[str, ...]:
    """Each token id's own text (what the repeat guard and the code confidences read); ids the tokenizer
    does not know, up to the model's `vocab_size`, are ""."""
    n = len(tok)
    return tuple(tok.decode([i]) if i < n else "" for i in range(n if vocab_size is None else vocab_size))


def pad_id(tok: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (causal LMs often ship without a pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def eos_ids(tok: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends an answer: the generation config's EOS list, else the tokenizer's."""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [eos]


def template_kwargs(tok: Any, thinking: bool = False) -> dict[str, Any]:
    """Extra chat-template variables this tokenizer's template understands."""
    template = getattr(tok, "chat_template", None) or ""
    return {"enable_thinking": thinking} if "enable_thinking" in template else {}


def _prompt_ids(tok: Any, note: str, medications: list[str], thinking: bool) -> list[int]:
    messages = prompts.build_messages(note, medications)
    return token_ids(
        tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **template_kwargs(tok, thinking)
        )
    )


def _recut(note: str, over: int, budget: int) -> tuple[str, int]:
    budget = max(32, int(budget - over * 1.2) - 16)
    return notes.prepare_note(note, max_tokens=budget).text, budget


def fit_note(
    tok: Any, note: str, medications: list[str], max_len: int, thinking: bool = False
) -> tuple[str, list[int]]:
    """The note re-cut (as `prepare` cuts notes) until its chat-templated prompt has at most `max_len` ids;
    returns the note and the prompt ids (hard-truncated from the left if re-cutting did not get there)."""
    budget = notes.count_tokens(note)
    ids = _prompt_ids(tok, note, medications, thinking)
    for _ in range(4):
        if len(ids) <= max_len:
            return note, ids
        note, budget = _recut(note, len(ids) - max_len, budget)
        ids = _prompt_ids(tok, note, medications, thinking)
    return note, ids[-max_len:]


def encode_prompt(
    tok: Any, note: str, medications: list[str] | None, max_len: int, thinking: bool = False
) -> list[int]:
    """Chat-templated prompt ids with the generation prompt, at most `max_len` of them."""
    return fit_note(tok, note, list(medications or []), max_len, thinking)[1]


def encode_example(
    tok: Any,
    note: str,
    medications: list[str] | None,
    answer: str,
    max_len: int,
    max_prompt: int | None = None,
    thinking: bool = False,
) -> tuple[list[int], int] | None:
    """(prompt + answer ids, prompt length) within `max_len`, the prompt cut to `max_prompt` as at inference
    (so the model trains on the notes it will be asked about); None when even a re-cut note does not fit."""
    medications = list(medications or [])
    if max_prompt:
        note = fit_note(tok, note, medications, max_prompt, thinking)[0]
    budget = notes.count_tokens(note)
    kwargs = template_kwargs(tok, thinking)
    for _ in range(4):
        messages = prompts.build_messages(note, medications)
        prompt = _prompt_ids(tok, note, medications, thinking)
        full = token_ids(
            tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": answer}], tokenize=True, **kwargs
            )
        )
        if full[: len(prompt)] != prompt:  # the template rewrote the prompt: concatenate instead
            full = prompt + tok(answer + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        if len(full) <= max_len:
            return list(full), len(prompt)
        note, budget = _recut(note, len(full) - max_len, budget)
    return None
