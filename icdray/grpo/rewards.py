"""GRPO rewards for coding answers: one contract, combined by the weights of `config.RewardConfig`.

Every reward is a plain function `f(completions, *, gold_codes, notes, **kw) -> list[float]` with one
float per completion (the TRL convention; extra columns arrive as keyword arguments and are ignored
when not needed). `score_batch` parses each completion once, runs the weighted rewards and returns
the total and every component, so a trainer can log them separately.

- format: the answer block parses (1.0), or parses with problems such as truncation (0.5), or not (0).
- code_f1: F1 of the code set against gold, from `metrics.prf` (not re-implemented).
- hierarchy: partial credit for near misses: the same 3-character category earns 0.5, the same
  chapter 0.25 (soft precision/recall over best matches).
- invalid: minus the share of predicted codes that are not valid ICD-10-CM codes.
- evidence: the share of cited quotes that really occur in the note (`evidence.quote_in_note`).
- length: optional penalty for completions longer than `max_chars`.

Why partial credit: an untrained model scores 0 on strict code match, so a group of samples has no
variance and GRPO learns nothing; near misses give the gradient a direction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from icdray import codes, evidence, metrics, prompts
from icdray.config import RewardConfig


def _parsed(completions: Sequence[Any], parsed: Sequence[prompts.Answer] | None) -> list[prompts.Answer]:
    return list(parsed) if parsed is not None else [prompts.parse_answer(c) for c in completions]


def format_reward(
    completions: Sequence[str], *, parsed: Sequence[prompts.Answer] | None = None, **_: Any
) -> list[float]:
    out = []
    for a in _parsed(completions, parsed):
        out.append(0.0 if not a.ok else 1.0 if not (a.flags - {prompts.FLAG_INVALID_CODES}) else 0.5)
    return out


def code_f1_reward(
    completions: Sequence[str],
    *,
    gold_codes: Sequence[Sequence[str]],
    parsed: Sequence[prompts.Answer] | None = None,
    **_: Any,
) -> list[float]:
    return [metrics.prf(a.codes, g)[2] for a, g in zip(_parsed(completions, parsed), gold_codes, strict=True)]


def _credit(a: str, b: str) -> float:
    if a == b:
        return 1.0
    if codes.category(a) == codes.category(b):
        return 0.5
    ca = codes.chapter(a)
    return 0.25 if ca is not None and ca == codes.chapter(b) else 0.0


def hierarchy_reward(
    completions: Sequence[str],
    *,
    gold_codes: Sequence[Sequence[str]],
    parsed: Sequence[prompts.Answer] | None = None,
    **_: Any,
) -> list[float]:
    out = []
    for a, g in zip(_parsed(completions, parsed), gold_codes, strict=True):
        pred, gold = a.codes, [codes.normalize(c) for c in g]
        if not pred or not gold:
            out.append(0.0)
            continue
        p = sum(max(_credit(x, y) for y in gold) for x in pred) / len(pred)
        r = sum(max(_credit(y, x) for x in pred) for y in gold) / len(gold)
        out.append(2 * p * r / (p + r) if p + r else 0.0)
    return out


def invalid_reward(
    completions: Sequence[str],
    *,
    parsed: Sequence[prompts.Answer] | None = None,
    codebook: codes.Codebook | None = None,
    **_: Any,
) -> list[float]:
    book = codebook or codes.DEFAULT
    out = []
    for a in _parsed(completions, parsed):
        out.append(-len(book.invalid(a.codes)) / len(a.codes) if a.codes else 0.0)
    return out


def evidence_reward(
    completions: Sequence[str],
    *,
    notes: Sequence[str],
    parsed: Sequence[prompts.Answer] | None = None,
    **_: Any,
) -> list[float]:
    out = []
    for a, note in zip(_parsed(completions, parsed), notes, strict=True):
        out.append(
            sum(evidence.quote_in_note(note, i.evidence) for i in a.items) / len(a.items) if a.items else 0.0
        )
    return out


def edits_reward(
    completions: Sequence[str], *, parsed: Sequence[prompts.Answer] | None = None, **_: Any
) -> list[float]:
    """-1 for an answer the coding edits would block (an error: Excludes1 conflict, manifestation or
    external cause as principal, ...), -0.25 per warning up to -1 more; 0 for a clean chart. Age and sex
    are not in the prompt, so the age/sex edits do not apply here."""
    from icdray import edits

    out = []
    for a in _parsed(completions, parsed):
        found = edits.edits(a.codes) if a.codes else []
        errors = sum(e.severity == "error" for e in found)
        warnings = len(found) - errors
        out.append(-(1.0 if errors else 0.0) - min(1.0, 0.25 * warnings))
    return out


def length_reward(completions: Sequence[str], *, max_chars: int = 6000, **_: Any) -> list[float]:
    return [-max(0, len(c or "") - max_chars) / max_chars for c in completions]


REWARDS: dict[str, Callable[..., list[float]]] = {
    "format": format_reward,
    "code_f1": code_f1_reward,
    "hierarchy": hierarchy_reward,
    "invalid": invalid_reward,
    "evidence": evidence_reward,
    "edits": edits_reward,
    "length": length_reward,
}


def score_batch(
    completions: Sequence[str],
    gold_codes: Sequence[Sequence[str]],
    notes: Sequence[str],
    weights: Mapping[str, float] | None = None,
    **kw: Any,
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the rewards; returns (total per completion, each component per completion)."""
    weights = RewardConfig().weights() if weights is None else weights
    unknown = set(weights) - set(REWARDS)
    if unknown:
        raise ValueError(f"unknown reward(s) {sorted(unknown)}; known: {sorted(REWARDS)}")
    if not (len(completions) == len(gold_codes) == len(notes)):
        raise ValueError("completions, gold_codes and notes must have the same length")
    parsed = [prompts.parse_answer(c) for c in completions]
    components = {
        name: REWARDS[name](completions, gold_codes=gold_codes, notes=notes, parsed=parsed, **kw)
        for name, w in weights.items()
        if w
    }
    total = [sum(weights[n] * components[n][i] for n in components) for i in range(len(completions))]
    return total, components


class RewardWorker:
    """Ray actor that scores batches, so scoring scales apart from generation (the ICD-10-CM tables load
    once per actor, not once per batch)."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.weights, self.max_chars = cfg.weights(), cfg.max_chars
        codes.DEFAULT.invalid(["I10"])  # load the code tables now, not inside the first timed step

    def score(
        self, completions: Sequence[str], gold_codes: Sequence[Sequence[str]], notes: Sequence[str]
    ) -> tuple[list[float], dict[str, list[float]]]:
        return score_batch(completions, gold_codes, notes, self.weights, max_chars=self.max_chars)
