"""The prompt and answer format: the one place that writes prompts and reads model answers.

Used by the teacher (exemplar answers), SFT targets, RL rollouts and rewards, evaluation and serving,
so they all agree on one format. A completion looks like::

    <reasoning>
    a short review: why the patient was admitted, what was treated or monitored
    </reasoning>
    <answer>
    {"codes": [{"evidence": "acute kidney injury", "code": "N17.9"}, {"evidence": "HLD", "code": "E78.5"}]}
    </answer>

Why: a brief reasoning first lets the model review the note before committing to codes; the answer is
one flat JSON object (a list of `{evidence, code}` string pairs) that a 135M model can learn and a
constrained-decoding grammar can describe. Each item's evidence comes first: the model copies the
phrase from the note, then writes the code for that phrase (in probes this order beat code-first by
0.2 sample-F1 at equal training time: the code is chosen from the quote instead of from frequency).
The principal diagnosis comes first. The quote makes each code checkable against the note.

`parse_answer` never raises, whatever it is given. It is lenient in a fixed, documented way and
reports every deviation as a flag (the `FLAG_*` constants):

* The LAST `<answer>` tag wins (tags match case-insensitively, spaces inside the brackets allowed);
  a block that is opened but never closed is read to the end and flagged `truncated`. A closing tag
  dropped by a stop string therefore yields `truncated` alone and `ok` stays True.
* A Markdown code fence around the JSON inside the block is accepted silently.
* With no `<answer>` tag, the last bare JSON object starting `{"codes":` (fenced or not) is used, and
  `no_answer_block` is still flagged: the codes are recovered for lenient scoring, but `ok` is False.
* JSON that does not parse, or is not an object with a `"codes"` list, is flagged `invalid_json`; the
  complete flat `{"code": ..., "evidence": ...}` objects inside it are salvaged by regular expression.
* Items that are not objects, lack a string `"code"`, or have a non-string `"evidence"` are skipped
  (`bad_items`). Codes are normalised with `codes.normalize`; evidence is stripped.
* Codes the codebook rejects are KEPT and flagged `invalid_codes`, so metrics can count them.
* Repeated codes are dropped, the first kept (`duplicate_codes`).
* At most `MAX_ITEMS` codes are kept and `10 * MAX_ITEMS` entries read (`too_many_codes`).
* Reasoning is the text of the tagged `<reasoning>` block before the answer; untagged prose is not
  reasoning (`no_reasoning` when absent or empty).

`Answer.ok` means "the answer block was found and parsed as JSON of the required shape": none of
`FORMAT_FLAGS` is set. Invalid or duplicate codes, truncation after complete JSON, missing reasoning
and the item cap are informational. `Answer.clean` means no flag at all.

Left out: code validity beyond the codebook check, checking that evidence really occurs in the note
(a reward's job), procedure codes, and any chat-template specifics (see `build_messages`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from icdray import codes

__all__ = [
    "FLAG_BAD_ITEMS",
    "FLAG_DUPLICATE_CODES",
    "FLAG_INVALID_CODES",
    "FLAG_INVALID_JSON",
    "FLAG_NO_ANSWER",
    "FLAG_NO_REASONING",
    "FLAG_TOO_MANY",
    "FLAG_TRUNCATED",
    "FORMAT_FLAGS",
    "MAX_ITEMS",
    "PROMPT_VERSION",
    "SYSTEM_PROMPT",
    "Answer",
    "CodeItem",
    "build_messages",
    "item_spans",
    "parse_answer",
    "render_answer",
    "render_user_prompt",
    "teacher_messages",
]

PROMPT_VERSION = "icd-v2"  # cache key: bump whenever the prompt or the answer format changes

MAX_ITEMS = 100  # codes kept per answer
_MAX_RAW_ITEMS = 10 * MAX_ITEMS  # list entries examined (bad or duplicate ones included)

FLAG_NO_ANSWER = "no_answer_block"
FLAG_INVALID_JSON = "invalid_json"
FLAG_BAD_ITEMS = "bad_items"
FLAG_INVALID_CODES = "invalid_codes"
FLAG_DUPLICATE_CODES = "duplicate_codes"
FLAG_NO_REASONING = "no_reasoning"
FLAG_TRUNCATED = "truncated"
FLAG_TOO_MANY = "too_many_codes"

FORMAT_FLAGS: frozenset[str] = frozenset({FLAG_NO_ANSWER, FLAG_INVALID_JSON, FLAG_BAD_ITEMS})
"""Flags that make `Answer.ok` False; all other flags are informational."""

SYSTEM_PROMPT = """\
You are a clinical coder. Give the ICD-10-CM codes this hospital stay supports: conditions treated or \
monitored, not negated findings or family history; the principal diagnosis first. Think briefly in \
<reasoning></reasoning>, then answer in <answer></answer> with JSON: \
{"codes": [{"evidence": "<short phrase copied from the note>", "code": "<ICD-10-CM code>"}]}"""


def render_user_prompt(note: str, medications: Sequence[str] = ()) -> str:
    """The user turn: the note and the medication list (one per line, each drug once); the format is in
    the system prompt."""
    if isinstance(medications, str):  # a str is a Sequence[str]: treat it as lines, not characters
        medications = medications.splitlines()
    meds = [m.strip() for m in (str(m) for m in (() if medications is None else medications)) if m.strip()]
    meds = list(dict.fromkeys(meds))
    med_block = "\n".join(f"- {m}" for m in meds) if meds else "(none recorded)"
    note_text = "" if note is None else str(note).strip()
    return f"Discharge note:\n{note_text}\n\nMedications:\n{med_block}"


def build_messages(note: str, medications: Sequence[str] = ()) -> list[dict[str, str]]:
    """System and user messages, ready for a chat template."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": render_user_prompt(note, medications)},
    ]


def teacher_messages(
    note: str, medications: Sequence[str] = (), gold: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """The student's messages; with `gold`, the coders' codes are appended for the teacher to explain.

    Without gold (the default) the teacher codes exactly as the student will, and exemplars are then
    filtered by agreement with gold; with gold it writes the reasoning for known codes.
    """
    messages = build_messages(note, medications)
    if gold:
        listed = ", ".join(codes.normalize(c) for c in gold)
        messages[1] = {
            "role": "user",
            "content": messages[1]["content"]
            + (
                f"\n\nProfessional coders assigned these codes: {listed}. Reason from the note to each of them, "
                "and give exactly these codes in the answer, each with its verbatim evidence."
            ),
        }
    return messages


@dataclass(frozen=True)
class CodeItem:
    code: str
    evidence: str = ""


@dataclass(frozen=True)
class Answer:
    reasoning: str
    items: tuple[CodeItem, ...]
    flags: frozenset[str]

    @property
    def codes(self) -> list[str]:
        """Normalised codes, unique, in order of appearance."""
        return [c for c in dict.fromkeys(codes.normalize(i.code) for i in self.items) if c]

    @property
    def ok(self) -> bool:
        """The answer block was found and parsed as JSON of the required shape (codes may be invalid)."""
        return not (self.flags & FORMAT_FLAGS)

    @property
    def clean(self) -> bool:
        """No flag at all: exactly the format, valid unique codes, with reasoning."""
        return not self.flags


# Keeps "<answer" / "</answer" inside JSON strings from being read as tags (`\u003c` is JSON for `<`).
_TAGLIKE_LT = re.compile(r"<(?=\s*/?\s*answer)", re.IGNORECASE)


def render_answer(reasoning: str, items: Sequence[CodeItem]) -> str:
    """A gold or exemplar completion in exactly the format `parse_answer` reads."""
    payload = {
        "codes": [{"evidence": (i.evidence or "").strip(), "code": codes.normalize(i.code)} for i in items]
    }
    body = _TAGLIKE_LT.sub(r"\\u003c", json.dumps(payload, ensure_ascii=False))
    return f"<reasoning>\n{(reasoning or '').strip()}\n</reasoning>\n<answer>\n{body}\n</answer>"


_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_REASONING_OPEN = re.compile(r"<\s*reasoning\s*>", re.IGNORECASE)
_REASONING_CLOSE = re.compile(r"<\s*/\s*reasoning\s*>", re.IGNORECASE)
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*(?:```)?$", re.DOTALL)
_CODES_OBJECT = re.compile(r'\{\s*"codes"\s*:')
# A complete flat JSON object whose values are scalars: what a salvageable item looks like.
_STR = r'"(?:[^"\\]|\\.)*"'
_PAIR = rf"\s*{_STR}\s*:\s*(?:{_STR}|null|true|false|-?\d+(?:\.\d+)?)\s*"
_FLAT_OBJECT = re.compile(rf"\{{(?:{_PAIR}(?:,{_PAIR})*)?\}}")


def _last(pattern: re.Pattern[str], text: str, end: int | None = None) -> re.Match[str] | None:
    """The last match of `pattern` in `text[:end]`, or None."""
    last = None
    for match in pattern.finditer(text, 0, len(text) if end is None else end):
        last = match
    return last


def _loads(text: str) -> tuple[Any, bool]:
    """(value, True), or (None, False) when `text` is not JSON (deep nesting included); never raises."""
    try:
        return json.loads(text), True
    except (ValueError, RecursionError):
        return None, False


def _codes_list(text: str) -> list[Any] | None:
    """The "codes" list when `text` is exactly a JSON object of the required shape, else None."""
    value, parsed = _loads(text)
    if parsed and isinstance(value, dict) and isinstance(value.get("codes"), list):
        return value["codes"]
    return None


def _salvage(text: str) -> Iterable[Any]:
    """Complete flat objects found anywhere in `text` (unparseable ones yield None: a bad item)."""
    for match in _FLAT_OBJECT.finditer(text):
        value, _ = _loads(match.group(0))
        yield value


def _reasoning(text: str, end: int) -> str:
    """Text from the first <reasoning> tag before `end` to the last </reasoning> before `end`."""
    opened = _REASONING_OPEN.search(text, 0, end)
    if opened is None:
        return ""
    closed = _last(_REASONING_CLOSE, text, end)
    stop = closed.start() if closed is not None and closed.start() >= opened.end() else end
    return text[opened.end() : stop].strip()


def _as_text(text: object) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    return ""


def parse_answer(text: object, codebook: codes.Codebook | None = None) -> Answer:
    """Read a completion into an `Answer`. Never raises; see the module docstring for the rules."""
    text = _as_text(text)
    book = codes.DEFAULT if codebook is None else codebook
    flags: set[str] = set()

    # 1. Locate the answer text.
    opened = _last(_ANSWER_OPEN, text)
    if opened is not None:
        answer_start = opened.start()
        closed = _ANSWER_CLOSE.search(text, opened.end())
        if closed is None:
            flags.add(FLAG_TRUNCATED)
        body: str | None = text[opened.end() : closed.start() if closed else len(text)].strip()
    else:
        flags.add(FLAG_NO_ANSWER)
        bare = _last(_CODES_OBJECT, text)
        answer_start = bare.start() if bare is not None else len(text)
        body = None
        if bare is not None:
            try:
                value, _ = json.JSONDecoder().raw_decode(text, bare.start())
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict) and isinstance(value.get("codes"), list):
                raw_items: Iterable[Any] = value["codes"]
            else:
                flags.add(FLAG_INVALID_JSON)
                raw_items = _salvage(text[bare.start() :])
        else:
            raw_items = ()

    # 2. Parse it.
    if body is not None:
        listed = _codes_list(body)
        if listed is None:
            fenced = _FENCE.match(body)
            if fenced is not None:
                body = fenced.group(1).strip()
                listed = _codes_list(body)
        if listed is not None:
            raw_items = listed
        else:
            flags.add(FLAG_INVALID_JSON)
            raw_items = _salvage(body)

    # 3. Validate the items.
    items: list[CodeItem] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_items):
        if len(items) >= MAX_ITEMS or n >= _MAX_RAW_ITEMS:
            flags.add(FLAG_TOO_MANY)
            break
        code = raw.get("code") if isinstance(raw, dict) else None
        evidence = raw.get("evidence") if isinstance(raw, dict) else None
        norm = codes.normalize(code) if isinstance(code, str) else ""
        if not norm or not (evidence is None or isinstance(evidence, str)):
            flags.add(FLAG_BAD_ITEMS)
            continue
        if norm in seen:
            flags.add(FLAG_DUPLICATE_CODES)
            continue
        seen.add(norm)
        if not book.is_valid(norm):
            flags.add(FLAG_INVALID_CODES)
        items.append(CodeItem(norm, (evidence or "").strip()))

    reasoning = _reasoning(text, answer_start)
    if not reasoning:
        flags.add(FLAG_NO_REASONING)
    return Answer(reasoning=reasoning, items=tuple(items), flags=frozenset(flags))


def item_spans(text: object) -> list[tuple[int, int, str]]:
    """(start, end, normalised code) of each `{"evidence": ..., "code": ...}` item of the answer block, in
    order, as character offsets into `text`: where in a completion each code's tokens are (GRPO's item
    credit). Reads the block `parse_answer` reads (the last `<answer>` tag); never raises."""
    text = _as_text(text)
    opened = _last(_ANSWER_OPEN, text)
    if opened is None:
        return []
    closed = _ANSWER_CLOSE.search(text, opened.end())
    out = []
    for match in _FLAT_OBJECT.finditer(text, opened.end(), closed.start() if closed else len(text)):
        value, _ = _loads(match.group(0))
        code = value.get("code") if isinstance(value, dict) else None
        if isinstance(code, str) and codes.normalize(code):
            out.append((match.start(), match.end(), codes.normalize(code)))
    return out
