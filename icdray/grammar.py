"""Constrained decoding: an EBNF grammar of the answer format whose codes can only be billable codes.

    answer ::= <reasoning> free text </reasoning> <answer> {"codes": [{"code": C, "evidence": "..."}, ...]} </answer>
    C      ::= a character trie over every billable ICD-10-CM code (74k codes, ~300 KB of grammar)

The shape is the one `prompts.render_answer` writes and `prompts.parse_answer` reads. vLLM compiles it
with xgrammar (~2-3 s once per engine, then ~0.04 ms of token masking per step). A trie, not a
`choice` list or a JSON-schema enum: those take 46-78 s to compile for this many codes.

A valid code is not a correct one: the constraint fixes validity, training fixes relevance.
Between 1 and `max_codes` codes (every admission has a principal diagnosis).
Left out: grammar-level checks that evidence occurs in the note.
"""

from __future__ import annotations

from collections.abc import Iterable

from icdray import codes


def _trie_rules(words: list[str]) -> str:
    """An EBNF expression matching exactly `words` (sorted, unique), factored by common prefixes."""
    if words == [""]:
        return '""'
    groups: dict[str, list[str]] = {}
    for w in words:
        groups.setdefault(w[:1], []).append(w[1:])
    alts = []
    for head, tails in groups.items():
        if head == "":
            alts.append('""')
            continue
        inner = _trie_rules(tails)
        alts.append(
            f'"{head}"'
            if inner == '""'
            else f'"{head}" {inner}'
            if "|" not in inner
            else f'"{head}" ({inner})'
        )
    return " | ".join(alts) if len(alts) > 1 else alts[0]


def answer_grammar(
    code_set: Iterable[str] | None = None,
    max_reasoning_chars: int = 1500,
    max_evidence_chars: int = 200,
    max_codes: int = 40,
) -> str:
    """The EBNF (xgrammar dialect) of an answer whose codes all come from `code_set` (default: billable)."""
    words = sorted(
        {codes.normalize(c) for c in (code_set if code_set is not None else codes.billable_codes())}
    )
    if not words:
        raise ValueError("answer_grammar needs at least one code")
    return "\n".join(
        [
            'root ::= "<reasoning>\\n" reasoning "\\n</reasoning>\\n<answer>\\n" payload "\\n</answer>"',
            f"reasoning ::= [^<]{{0,{max_reasoning_chars}}}",
            # an admission has at least one diagnosis; MIMIC-IV admissions have up to 39
            f'payload ::= "{{\\"codes\\": [" item (", " item){{0,{max_codes - 1}}} "]}}"',
            'item ::= "{\\"code\\": \\"" code "\\", \\"evidence\\": \\"" evidence "\\"}"',
            f'evidence ::= [^"\\\\<\\n]{{0,{max_evidence_chars}}}',
            f"code ::= {_trie_rules(words)}",
        ]
    )
