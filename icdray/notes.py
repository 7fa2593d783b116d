"""Discharge-note text: sections, cleaning, leakage removal and a token budget.

MIMIC-IV discharge summaries are plain text whose sections start with a `Heading:` line (docs/data.md). `prepare_note` keeps the note's own words (coders cite them as evidence), removes the
"Discharge Diagnosis" section by default (it states the answer), and fits the note into a token
budget by dropping the sections that carry least coding signal before cutting text.

Token counts here are approximate (word pieces and punctuation, ~1.1–1.3x fewer than a BPE
tokenizer's count on clinical text) so that `prepare` needs no model; training stages re-tokenize
with the real tokenizer and apply their own limit.
Left out: spelling correction, abbreviation expansion, de-identification (MIMIC is already).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADINGS: tuple[str, ...] = (
    "Allergies",
    "Chief Complaint",
    "Major Surgical or Invasive Procedure",
    "History of Present Illness",
    "Past Medical History",
    "Social History",
    "Family History",
    "Physical Exam",
    "Pertinent Results",
    "Brief Hospital Course",
    "Medications on Admission",
    "Discharge Medications",
    "Discharge Disposition",
    "Discharge Diagnosis",
    "Discharge Condition",
    "Discharge Instructions",
    "Followup Instructions",
)
LEAKY = "Discharge Diagnosis"
# Dropped first when a note is over budget: least coding signal first.
DROP_ORDER: tuple[str, ...] = (
    "Followup Instructions",
    "Discharge Condition",
    "Discharge Disposition",
    "Discharge Instructions",
    "Physical Exam",
    "Pertinent Results",
    "Discharge Medications",
    "Family History",
    "Social History",
    # dropped last, before text is cut: the identifier preamble, and lists the prompt carries anyway
    "",
    "Medications on Admission",
    "Major Surgical or Invasive Procedure",
)
# When a note is still over budget after DROP_ORDER, the budget goes to these sections first (most coding
# signal per token: the course names what was treated, the past history the chronic conditions).
KEEP_ORDER: tuple[str, ...] = (
    "Brief Hospital Course",
    "Past Medical History",
    "Chief Complaint",
    "Allergies",
    "History of Present Illness",
    "Major Surgical or Invasive Procedure",
    "Medications on Admission",
    "",
)
_HEADING_RE = re.compile(
    r"^[ \t]*(" + "|".join(re.escape(h) for h in HEADINGS) + r")[ \t]*:[ \t]*", re.IGNORECASE | re.MULTILINE
)
_CANON = {h.lower(): h for h in HEADINGS}
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_BLANKS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")
_TRAILING = re.compile(r"[ \t]+\n")


@dataclass(frozen=True)
class Section:
    heading: str  # canonical heading, "" for the preamble before the first heading
    body: str


def split_sections(text: str) -> list[Section]:
    """Split on known `Heading:` lines; unknown `Foo:` lines stay inside their section."""
    out: list[Section] = []
    matches = list(_HEADING_RE.finditer(text))
    start = matches[0].start() if matches else len(text)
    if text[:start].strip():
        out.append(Section("", text[:start].strip()))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out.append(Section(_CANON[m.group(1).lower()], text[m.end() : end].strip()))
    return out


def clean(text: str) -> str:
    """Normalise line endings and whitespace runs; keep `___` placeholders and the words."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def render(sections: list[Section]) -> str:
    return "\n\n".join(f"{s.heading}:\n{s.body}" if s.heading else s.body for s in sections)


def _cut(text: str, budget: int) -> str:
    if budget <= 0:
        return ""
    for i, m in enumerate(_TOKEN_RE.finditer(text)):
        if i == budget:
            return text[: m.start()].rstrip()
    return text


@dataclass(frozen=True)
class PreparedNote:
    text: str
    n_tokens: int
    truncated: bool
    sections: tuple[str, ...]  # headings kept, in order


def prepare_note(
    text: str, *, keep_discharge_diagnosis: bool = False, max_tokens: int = 3000
) -> PreparedNote:
    """Clean, drop the leaky section (unless kept), fit the budget. Pure: same input, same output."""
    sections = [Section(s.heading, clean(s.body)) for s in split_sections(clean(text))]
    if not keep_discharge_diagnosis:
        sections = [s for s in sections if s.heading != LEAKY]
    sections = [s for s in sections if s.body]
    sizes = [count_tokens(s.body) + count_tokens(s.heading) + 1 for s in sections]
    truncated = False
    for heading in DROP_ORDER:
        if sum(sizes) <= max_tokens:
            break
        for i in range(len(sections) - 1, -1, -1):
            if sections[i].heading == heading:
                del sections[i], sizes[i]
                truncated = True
    if sum(sizes) > max_tokens:  # still over: the sections coders read first get the budget first
        sections, truncated = _share(sections, sizes, max_tokens), True
    body = render(sections)
    if count_tokens(body) > max_tokens:  # headings and joins can still tip it over
        body = _cut(body, max_tokens)
    return PreparedNote(body, count_tokens(body), truncated, tuple(s.heading for s in sections))


def _share(sections: list[Section], sizes: list[int], budget: int) -> list[Section]:
    """Give each section, in `KEEP_ORDER`, as much of the budget as it needs (cutting the last one that only
    partly fits); sections left without budget are dropped; the note keeps its own order."""
    rank = {h: i for i, h in enumerate(KEEP_ORDER)}
    rank[LEAKY] = -1  # present only when kept on request (a leak study): then it comes first
    order = sorted(range(len(sections)), key=lambda i: (rank.get(sections[i].heading, len(rank)), i))
    left, keep = budget, {}
    for i in order:
        if left <= count_tokens(sections[i].heading) + 8:
            break
        s = sections[i]
        room = left - count_tokens(s.heading) - 1
        keep[i] = s if sizes[i] <= left else Section(s.heading, _cut(s.body, room))
        left -= min(sizes[i], left)
    return [keep[i] for i in sorted(keep)]
