"""Constrained decoding: an EBNF grammar of the answer format whose codes come from the run's label space.

    answer ::= <reasoning> text </reasoning> <answer> {"codes": [{"evidence": "...", "code": C}, ...]} </answer>
    C      ::= a character trie over the label space (every billable ICD-10-CM code by default: 74k codes,
               ~300 KB of grammar; or the run's top-k codes)

The shape is the one `prompts.render_answer` writes and `prompts.parse_answer` reads: each item's
evidence (a short phrase copied from the note) comes before its code, so the model picks the code
from the phrase it just wrote. vLLM compiles the grammar with xgrammar (~2-3 s once per engine, then
~0.04 ms of token masking per step). A trie, not a `choice` list or a JSON-schema enum: those take
46-78 s to compile for this many codes.

`Bounds` caps the reasoning, each evidence phrase and the number of codes. Under the grammar a model
can write at most one token per character, so `Bounds.worst_case_tokens()` is a token budget inside
which every constrained answer closes, whatever the model does: engines generate with that budget.
A valid code is not a correct one: the constraint fixes validity, training fixes relevance.
Between 1 and `max_codes` codes (every admission has a principal diagnosis).
Whether a quote occurs in the note is not in the grammar (one grammar serves every note): `QuoteGuard`,
a logits processor next to `RepeatGuard`, keeps each quote to the note's text.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from icdray import codes

_CODE_CHARS = re.compile(r"[A-Z0-9.]+")
# the literal pieces of the answer, shared by the grammar and the worst-case count
HEAD, MIDDLE, TAIL = "<reasoning>\n", "\n</reasoning>\n<answer>\n", "\n</answer>"
OPEN, CLOSE, SEP = '{"codes": [', "]}", ", "
ITEM_OPEN, ITEM_MID, ITEM_CLOSE = '{"evidence": "', '", "code": "', '"}'


@dataclass(frozen=True)
class Bounds:
    max_reasoning_chars: int = 300
    max_evidence_chars: int = 60
    max_codes: int = 25

    def worst_case_tokens(self, longest_code: int = 8) -> int:
        """Tokens of the longest answer the grammar allows (one token per character) plus the stop token."""
        literal = len(HEAD) + len(MIDDLE) + len(TAIL) + len(OPEN) + len(CLOSE)
        item = len(ITEM_OPEN) + self.max_evidence_chars + len(ITEM_MID) + longest_code + len(ITEM_CLOSE)
        return (
            literal + self.max_reasoning_chars + self.max_codes * item + (self.max_codes - 1) * len(SEP) + 1
        )


_NOT_EVIDENCE = re.compile(r"[^ !#-;=-\[\]-~]")  # the complement of the grammar's evidence characters
_NOT_REASONING = re.compile(r"[^ -;=-~\n]")


def clean_evidence(text: str, max_chars: int) -> str:
    """A quote the grammar accepts and the note still contains (whitespace aside): whitespace collapsed, then
    the longest run of printable ASCII without quote, backslash or `<` ("Ménière's disease" gives
    "re's disease"), cut at a word boundary to `max_chars`."""
    runs = [r.strip() for r in _NOT_EVIDENCE.split(" ".join((text or "").split()))]
    best = max(runs, key=len, default="")
    if len(best) <= max_chars:
        return best
    head = best[: max_chars + 1]
    return (head.rsplit(" ", 1)[0] if " " in head[:max_chars] else best[:max_chars]).rstrip()


def clean_reasoning(text: str, max_chars: int) -> str:
    """Reasoning the grammar accepts: printable ASCII and newlines, no `<`, cut at the last sentence end."""
    text = _NOT_REASONING.sub(" ", (text or "").strip())
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind(".\n"))
    return (head[: end + 1] if end > 0 else head).rstrip()


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


@dataclass(frozen=True)
class AnswerConstraint:
    """What constrained decoding enforces: the answer grammar, and the code space of the no-repeat guard."""

    grammar: str
    code_key: str  # "billable" or the comma-joined codes of a restricted label space (vllm_ext.guard_for)
    max_tokens: int  # a budget inside which every answer of this grammar closes (Bounds.worst_case_tokens)


def constraint(code_space: Sequence[str] | None = None, bounds: Bounds | None = None) -> AnswerConstraint:
    """The grammar over `code_space` (None: every billable code) with its no-repeat key and token budget."""
    bounds = bounds or Bounds()
    words = sorted(
        {codes.normalize(c) for c in (code_space if code_space is not None else codes.billable_codes())}
    )
    key = "billable" if code_space is None else ",".join(words)
    longest = max(len(w) for w in words) if words else 8
    return AnswerConstraint(answer_grammar(words, bounds), key, bounds.worst_case_tokens(longest))


def _lit(text: str) -> str:
    """An EBNF string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def answer_grammar(code_set: Iterable[str] | None = None, bounds: Bounds | None = None) -> str:
    """The EBNF (xgrammar dialect) of an answer whose codes all come from `code_set` (default: billable)."""
    b = bounds or Bounds()
    words = sorted(
        {codes.normalize(c) for c in (code_set if code_set is not None else codes.billable_codes())}
    )
    if not words:
        raise ValueError("answer_grammar needs at least one code")
    if b.max_codes < 1:
        raise ValueError("Bounds.max_codes must be at least 1")
    return "\n".join(
        [
            f"root ::= {_lit(HEAD)} reasoning {_lit(MIDDLE)} payload {_lit(TAIL)}",
            # printable ASCII only: at most one token per character, which `worst_case_tokens` relies on
            f"reasoning ::= [ -;=-~\\n]{{0,{b.max_reasoning_chars}}}",
            f"payload ::= {_lit(OPEN)} item ({_lit(SEP)} item){{0,{b.max_codes - 1}}} {_lit(CLOSE)}",
            f"item ::= {_lit(ITEM_OPEN)} evidence {_lit(ITEM_MID)} code {_lit(ITEM_CLOSE)}",
            f"evidence ::= [ -!#-;=-\\[\\]-~]{{0,{b.max_evidence_chars}}}",  # no quote, backslash or <
            f"code ::= {_trie_rules(words)}",
        ]
    )


_CODE_FIELD = '"code": "'
_WRITTEN = re.compile(r'"code": "([^"]*)"')


class RepeatGuard:
    """Which tokens would write a code the answer already holds: greedy decoding under the grammar otherwise
    loops on one code (`I20.0` for every evidence phrase, in a probe with the base model).

    Pure and deterministic in the answer text so far, so the sampler (a vLLM logits processor) and the
    GRPO learner (which rebuilds the sampler's token mask) ban exactly the same tokens. Inside a
    `"code": "` field holding the partial code `s`, a token is banned when it closes a code already
    written, or when every code of the label space that starts with `s + token` is already written.
    Codes are ASCII, so the text is the concatenation of each token's own decoding (`pieces`).
    """

    def __init__(self, code_space: Iterable[str], pieces: Sequence[str]) -> None:
        self.codes = sorted({codes.normalize(c) for c in code_space})
        # token ids by the code characters they start with, and whether they then close the string
        self.by_head: dict[str, list[tuple[int, bool]]] = {}
        for i, piece in enumerate(pieces):
            head, quote, _ = piece.partition('"')
            if head and not _CODE_CHARS.fullmatch(head):
                continue
            if head or quote:
                self.by_head.setdefault(head, []).append((i, bool(quote)))

    def _count(self, prefix: str, pool: Sequence[str]) -> int:
        return bisect.bisect_left(pool, prefix + "\x7f") - bisect.bisect_left(pool, prefix)

    def banned(self, text: str) -> list[int]:
        """Token ids that must not come next after `text` (the answer so far); [] outside a code field."""
        at = text.rfind(_CODE_FIELD)
        if at < 0:
            return []
        partial = text[at + len(_CODE_FIELD) :]
        if '"' in partial:
            return []
        written = sorted({m.group(1) for m in _WRITTEN.finditer(text)})
        out = []
        for code in written:
            if not code.startswith(partial):
                continue
            rest = code[len(partial) :]
            for k in range(len(rest) + 1):
                q = partial + rest[:k]
                left = self._count(q, self.codes) - self._count(q, written)
                for token, closes in self.by_head.get(rest[:k], ()):
                    if (closes and k == len(rest)) or (not closes and k and left <= 0):
                        out.append(token)
        return out


_WS_RUN = re.compile(r"\s+")
_MAX_PIECE = 48  # longer tokens are never proposed inside a quote (none of the vocabularies here has one)
_MIN_QUOTE = 2  # evidence.quote_in_note's shortest quote


def quote_text(text: str) -> str:
    """The form quotes are matched in (as `evidence.find_span` does): lower case, every run of whitespace one
    space; characters the grammar keeps out of evidence become NUL, which no quote can cross."""
    return _NOT_EVIDENCE.sub("\x00", _WS_RUN.sub(" ", text.lower()))


def note_of(prompt_text: str) -> str:
    """The note inside a rendered user prompt (`prompts.render_user_prompt`): what a quote may copy. A text
    without the prompt's markers is returned whole."""
    head, tail = "Discharge note:\n", "\n\nMedications:\n"
    start = prompt_text.find(head)
    start = 0 if start < 0 else start + len(head)
    end = prompt_text.rfind(tail)
    return prompt_text[start : end if end >= start else len(prompt_text)]


class QuoteGuard:
    """Which tokens keep an evidence quote copied from the note: without it 24% of the demo model's quotes
    were not in the note ("reflux" for K21.9 in a note without reflux), and those went with wrong codes.

    Pure and deterministic in (note, answer so far), like `RepeatGuard`, so the sampler and the GRPO
    learner's mask replay allow exactly the same tokens. Inside an `"evidence": "` field holding the
    partial quote `q`, a token is allowed when `q + token` still occurs in the note (case and whitespace
    aside, as `evidence.quote_in_note` matches), or when the token closes the field and the quote has at
    least two characters. A token that opens the field and starts the quote in one piece (`"H`) is banned
    when its quote part is not in the note. `rule` returns (allowed ids or None, banned ids).
    Left out: tokenizers whose per-id decoding drops a word's leading space (sentencepiece's legacy mode):
    there the concatenated pieces are not the answer's text.
    """

    def __init__(self, pieces: Sequence[str]) -> None:
        self.by_text: dict[str, list[int]] = {}  # a quote-only piece's matching form -> ids
        self.closing: dict[str, list[int]] = {}  # the matching form of the quote part before `"` -> ids
        self.prefixes: set[str] = {""}
        for i, piece in enumerate(pieces):
            head, quote, _ = piece.partition('"')
            key = quote_text(head)
            if not (head or quote) or "\x00" in key or len(key) > _MAX_PIECE:
                continue
            (self.closing if quote else self.by_text).setdefault(key, []).append(i)
            self.prefixes.update(key[:k] for k in range(1, len(key) + 1))
        # tokens that finish ITEM_OPEN's last k characters and go on into the quote: k -> [(id, the rest)]
        self.entering: dict[int, list[tuple[int, str]]] = {}
        self._openings: dict[str, list[int] | None] = {}  # note -> the allowed first tokens of a quote
        for i, piece in enumerate(pieces):
            for k in range(1, len(ITEM_OPEN) + 1):
                lit = ITEM_OPEN[-k:]
                if piece.startswith(lit) and len(piece) > k:
                    self.entering.setdefault(k, []).append((i, piece[k:]))

    def _extensions(self, note: str, quote: str) -> list[int] | None:
        q = quote_text(quote)
        if "\x00" in q:
            return None
        if q:
            ends, at = [], note.find(q)
            while at >= 0:
                ends.append(at + len(q))
                at = note.find(q, at + 1)
        else:
            ends = list(range(len(note) + 1))
        if not ends:
            return None  # the quote already left the note (an unguarded start): nothing to keep it to
        leads = ("", " ") if q.endswith(" ") else ("",)  # " pain" after "chest " collapses to one space
        out: set[int] = set()
        for e in ends:
            for lead in leads:
                for k in range(_MAX_PIECE + 1):
                    key = lead + note[e : e + k]
                    if key not in self.prefixes or (k and e + k > len(note)):
                        break
                    out.update(self.by_text.get(key, ()))
                    if len((q + key).strip()) >= _MIN_QUOTE:
                        out.update(self.closing.get(key, ()))
        return sorted(out)

    def _starts_in(self, note: str, rest: str) -> bool:
        head, quote, _ = rest.partition('"')
        q = quote_text(head)
        return "\x00" not in q and q in note and (not quote or len(q.strip()) >= _MIN_QUOTE)

    def rule(self, note: str, text: str) -> tuple[list[int] | None, list[int]]:
        """(the only tokens allowed next, or None for no such limit; tokens banned) after `text`, the answer
        so far, for an answer about `note` in its matching form (`quote_text`)."""
        body = text.find(MIDDLE)
        if body < 0:
            return None, []
        body += len(MIDDLE)
        at = text.rfind(ITEM_OPEN, body)
        if at >= 0 and '"' not in text[at + len(ITEM_OPEN) :]:
            quote = text[at + len(ITEM_OPEN) :]
            if quote:
                return self._extensions(note, quote), []
            if note not in self._openings:  # every item starts here: once per note
                if len(self._openings) >= 512:
                    self._openings.clear()
                self._openings[note] = self._extensions(note, "")
            return self._openings[note], []
        for k in range(len(ITEM_OPEN) - 1, -1, -1):
            if (k and not text.endswith(ITEM_OPEN[:k])) or (not k and not text.endswith((OPEN, SEP))):
                continue
            if len(text) - k < body:
                continue
            need = len(ITEM_OPEN) - k
            return None, [i for i, rest in self.entering.get(need, ()) if not self._starts_in(note, rest)]
        return None, []


class AnswerGuards:
    """Both guards as one rule, the one the sampler (`vllm_ext.AnswerGuards`) and the GRPO learner's mask
    replay (`grpo/masks.py`) apply, so the two cannot drift apart. Either guard may be off (None)."""

    def __init__(self, pieces: Sequence[str], repeat: RepeatGuard | None, quotes: QuoteGuard | None) -> None:
        self.pieces, self.repeat, self.quotes = pieces, repeat, quotes

    def note(self, prompt_ids: Sequence[int]) -> str:
        """The note of a request, in the quote guard's matching form, read from its prompt ids."""
        return quote_text(note_of("".join(self.pieces[int(t)] for t in prompt_ids)))

    def rule(self, note: str, text: str) -> tuple[list[int] | None, list[int]]:
        """(the only tokens allowed next or None, tokens banned) after `text`, the answer so far."""
        allowed, banned = self.quotes.rule(note, text) if self.quotes is not None else (None, [])
        if self.repeat is not None:
            banned = banned + self.repeat.banned(text)
        return allowed, banned


def guarded(legal: Any, allowed: list[int] | None, banned: list[int]) -> Any:
    """(V,) bool tensor: the `legal` tokens (the grammar's) limited to `allowed` (None: no limit) minus `banned`;
    `legal` unchanged when nothing would be left (the guards never take a row's last legal token)."""
    import torch

    keep = legal.clone()
    if allowed is not None:
        only = torch.zeros_like(keep)
        only[torch.tensor(allowed, dtype=torch.long, device=keep.device)] = True
        keep &= only
    if banned:
        keep[torch.tensor(banned, dtype=torch.long, device=keep.device)] = False
    return keep if bool(keep.any()) else legal
