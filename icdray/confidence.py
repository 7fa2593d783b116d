"""Confidence per code from the model itself, calibrated on the validation split.

Raw score: the probability the decoder gave the code's own tokens, the characters of the code and
the closing quote that ends it (under constrained greedy decoding, the product of the masked
distribution's probabilities: forced characters contribute 1). It says how sure the model was of
*this* code given the evidence phrase it had just written.

Calibration: isotonic regression of "the code is in gold" on the raw score over every code the model
wrote for the validation notes (monotone, so the ranking is the model's), stored as a step function
(`Calibration.points`). `fit` also picks the threshold: the lowest confidence whose codes reach the
target precision (`evaluate.auto_precision`) on validation; a chart is `auto_eligible` when every code clears it and no edit blocks it.
The reliability table (`bins`) and plot show predicted vs observed precision.

Decision rule: a small model keeps writing codes after the note's last supported one (the grammar's
list ends only when the model closes it), and those late codes are the ones whose quote is not in
the note and whose confidence is low (demo: 9% of codes with an unfound quote are right, 54% of
those with a found one). `apply_cut` keeps a code when its quote is in the note and its raw score
reaches a cut; `tune_cut` picks the cut on validation for the highest sample-F1, as the TF-IDF
baseline's threshold is tuned there.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_CODE_FIELD = re.compile(r'"code": "([^"]*)"')


def code_scores(
    token_ids: Sequence[int], logprobs: Sequence[float], pieces: Sequence[str]
) -> dict[str, float]:
    """code -> probability of its tokens (those overlapping the code's characters and its closing quote)."""
    import math

    starts, text = [], ""
    for t in token_ids:
        starts.append(len(text))
        text += pieces[t]
    out: dict[str, float] = {}
    for m in _CODE_FIELD.finditer(text):
        lo, hi = m.start(1), m.end(1) + 1  # the code and the quote that closes it
        total = 0.0
        for i, s in enumerate(starts):
            e = starts[i + 1] if i + 1 < len(starts) else len(text)
            if s < hi and e > lo:
                total += logprobs[i]
        out.setdefault(m.group(1), math.exp(total))
    return out


@dataclass
class Calibration:
    points: list[tuple[float, float]]  # (raw score, calibrated precision), raw ascending: a step function
    threshold: float = 1.0  # calibrated confidence at or above which a code is auto-eligible
    target_precision: float = 0.9
    precision_at_threshold: float = 0.0  # on validation
    coverage_at_threshold: float = 0.0  # share of validation codes at or above the threshold
    n_codes: int = 0
    bins: list[dict[str, float]] = field(default_factory=list)  # reliability: mean predicted vs observed
    cut: float = 0.0  # the decision rule's raw-score cut (`tune_cut`): a code below it is not supported

    def __call__(self, raw: float) -> float:
        if not self.points:
            return raw
        xs = [x for x, _ in self.points]
        i = bisect.bisect_right(xs, raw) - 1
        return self.points[max(0, i)][1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(**{**d, "points": [tuple(p) for p in d["points"]]})


def fit(
    raw: Sequence[float], correct: Sequence[bool], target_precision: float = 0.9, n_bins: int = 10
) -> Calibration:
    """Isotonic calibration of raw scores against correctness, its auto-eligibility threshold and bins."""
    from sklearn.isotonic import IsotonicRegression

    if len(raw) != len(correct):
        raise ValueError("raw scores and correctness must align")
    if not raw:
        return Calibration([], target_precision=target_precision)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
        list(raw), [float(c) for c in correct]
    )
    points = sorted({(float(x), float(y)) for x, y in zip(iso.X_thresholds_, iso.y_thresholds_, strict=True)})
    cal = Calibration(points, target_precision=target_precision, n_codes=len(raw))
    conf = [cal(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: -conf[i])
    hits = 0
    best = None
    for k, i in enumerate(order, 1):  # the largest confident set whose precision meets the target
        hits += bool(correct[i])
        if hits / k >= target_precision and (k == len(order) or conf[order[k]] < conf[i]):
            best = (conf[i], hits / k, k / len(order))
    if best is not None:
        cal.threshold, cal.precision_at_threshold, cal.coverage_at_threshold = best
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == n_bins - 1 and c == 1.0)]
        if idx:
            cal.bins.append(
                {
                    "lo": lo,
                    "hi": hi,
                    "n": len(idx),
                    "predicted": sum(conf[i] for i in idx) / len(idx),
                    "observed": sum(bool(correct[i]) for i in idx) / len(idx),
                }
            )
    return cal


Scored = tuple[str, float, bool]  # (code, raw confidence, its evidence quote is in the note)


def apply_cut(answer: Sequence[Scored], cut: float) -> list[str]:
    """The codes of one answer (in answer order) that cite the note and whose confidence reaches `cut`.
    When none does, the best-scoring code citing the note (else the best-scoring code): an admission
    always has a diagnosis."""
    kept = [c for c, s, found in answer if found and s >= cut]
    if kept or not answer:
        return kept
    pool = [a for a in answer if a[2]] or list(answer)
    return [max(pool, key=lambda a: a[1])[0]]


def tune_cut(
    answers: Sequence[Sequence[Scored]], golds: Sequence[Collection[str]], max_cuts: int = 200
) -> tuple[float, float, float]:
    """(cut, sample-F1 with the rule, sample-F1 of the answers as written) on labelled answers. The cut
    is the answers' own score (at most `max_cuts` of them, evenly spaced in rank; or 0, which keeps
    every code citing the note) with the highest sample-F1 under `apply_cut`, the lowest on ties."""
    from icdray import metrics

    if len(answers) != len(golds):
        raise ValueError("answers and golds must align")

    def f1(preds: list[list[str]]) -> float:
        return sum(metrics.per_admission_f1(preds, golds)) / max(1, len(preds))

    written = f1([[c for c, _, _ in a] for a in answers])
    best = (f1([apply_cut(a, 0.0) for a in answers]), 0.0)
    cuts = sorted({s for a in answers for _, s, _ in a if s > 0.0})
    if len(cuts) > max_cuts:
        cuts = [cuts[round(i * (len(cuts) - 1) / (max_cuts - 1))] for i in range(max_cuts)]
    for cut in cuts:
        got = f1([apply_cut(a, cut) for a in answers])
        if got > best[0]:
            best = (got, cut)
    return best[1], best[0], written


def auto_eligible(confidences: Sequence[float], cal: Calibration | None, blocked: bool) -> bool:
    """A chart a coder need not review: every code clears the validated threshold and no edit blocks it."""
    return cal is not None and bool(confidences) and not blocked and min(confidences) >= cal.threshold
