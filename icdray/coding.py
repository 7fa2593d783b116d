"""A coded chart: one model answer turned into what a coder reviews, for Serve and the batch job alike.

    answer text + its tokens' log-probs --annotate--> codes (description, evidence span, calibrated
    confidence, role principal|secondary, sequence) + edits + MS-DRG + auto-eligibility

Left out: the answer's generation (the engines') and any storage (the feedback store, the batch job's
parquet).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from icdray import codes, confidence, drg, edits, evidence, prompts


@dataclass
class CodedItem:
    code: str
    description: str
    evidence: str
    evidence_span: list[int] | None  # [start, end) of the evidence in the note, or None when not found
    valid: bool
    confidence: float  # calibrated when a calibration is given, else the raw score
    role: str  # principal | secondary
    sequence: int
    # the decision rule (`confidence.apply_cut`): the quote is in the note and the raw confidence reaches
    # the calibration's cut; a code that is not supported is still shown, for the coder to review
    supported: bool = True


@dataclass
class CodedChart:
    codes: list[CodedItem]
    reasoning: str
    edits: list[dict[str, Any]] = field(default_factory=list)
    drg: dict[str, Any] | None = None
    auto_eligible: bool = False
    flags: list[str] = field(default_factory=list)  # the parser's (prompts.FLAG_*)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def annotate(
    note: str,
    text: str,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    pieces: Sequence[str],
    calibration: confidence.Calibration | None = None,
    age: int | None = None,
    sex: str | None = None,
) -> CodedChart:
    answer = prompts.parse_answer(text)
    raw = confidence.code_scores(token_ids, logprobs, pieces)
    items = []
    for n, item in enumerate(answer.items):
        span = evidence.find_span(note, item.evidence) if item.evidence else None
        valid = codes.is_valid(item.code)
        score = raw.get(item.code, 0.0)
        items.append(
            CodedItem(
                code=item.code,
                description=(codes.describe(item.code) or "") if valid else "",
                evidence=item.evidence or "",
                evidence_span=[span.start, span.end] if span else None,
                valid=valid,
                confidence=round(calibration(score) if calibration else score, 4),
                role="principal" if n == 0 else "secondary",
                sequence=n + 1,
                supported=span is not None and score >= (calibration.cut if calibration else 0.0),
            )
        )
    chart = [c.code for c in items if c.valid]
    found = edits.edits(chart, age, sex)
    grouping = drg.group(chart, age, sex) if chart else None
    return CodedChart(
        codes=items,
        reasoning=answer.reasoning,
        edits=[e.to_dict() for e in found],
        drg=grouping.to_dict() if grouping else None,
        auto_eligible=confidence.auto_eligible(
            [c.confidence for c in items], calibration, edits.blocking(found)
        ),
        flags=sorted(answer.flags),
    )
