"""Scoring of ICD-10-CM code predictions: the one scorer that rewards and every evaluation call.

Each admission is scored as a *set* of codes. Codes are normalised with `codes.normalize` first
(`N179` == `N17.9`), empty strings are dropped and duplicates collapse, so repeating a code never
changes a score.

Reported (see `score`):

* sample P/R/F1 (headline `sample_f1`: mean of per-admission F1), micro P/R/F1 and macro F1 over
  every code seen in gold or predictions. These equal scikit-learn 1.9.1's
  `precision_score`/`recall_score`/`f1_score` with `average="samples"|"micro"|"macro"` and
  `zero_division=0` on `MultiLabelBinarizer().fit(gold ∪ pred)` labels.
* the same sample/micro F1 after mapping codes to their 3-character category and to their chapter,
  for partial credit on near misses.
* `invalid_rate` (predicted codes the codebook rejects), `empty_rate`, mean set sizes.
* with training frequencies: micro F1 on rare / frequent / unseen codes, with their gold support.
* `precision_at_k` for ranked outputs (P@8, P@15 of the coding literature).

Zero-division convention (what scikit-learn 1.9.1 does with `zero_division=0`): any ratio with a
zero denominator is 0.0. Per admission: empty prediction -> precision 0; empty gold -> recall 0;
F1 = 2|P∩G| / (|P|+|G|), so *both empty scores 0.0, not 1.0*, and such admissions still count in
the sample mean. Micro scores with no predicted (or no gold) codes at all are 0.0; macro F1 over an
empty label set is 0.0.

Uncertainty: `bootstrap_ci` (percentile interval of a mean over admissions) and `paired_bootstrap`
(the difference of two models scored on the same admissions, resampled together), seeded and exact
to a hand computation.

Deliberately left out: ranking metrics other than P@k (AUC, MAP), hierarchy-distance or
description-similarity credit; code knowledge lives in `icdray.codes`.
No scikit-learn, Ray or torch here: plain sets, fast enough for 20k admissions x 20 codes.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from icdray import codes

DEFAULT_COLUMNS: tuple[str, ...] = (
    "sample_f1",
    "micro_f1",
    "macro_f1",
    "category_micro_f1",
    "invalid_rate",
    "empty_rate",
)
MISSING = "–"

CodeSet = frozenset[str]


@functools.lru_cache(maxsize=200_000)
def _norm(code: str) -> str:
    return codes.normalize(code)


def _normalize(code: object) -> str:
    return _norm(code) if isinstance(code, str) else ""


@functools.lru_cache(maxsize=200_000)
def _chapter_key(code: str) -> str:
    """Chapter of a normalised code; unknown codes map to '?' + their category (always a miss
    against real gold codes, but never merged with a different unknown category)."""
    ch = codes.chapter(code)
    return ch if ch is not None else "?" + codes.category(code)


def _category_key(code: str) -> str:
    return code[:3]


def _with_ancestors(codes_: CodeSet) -> CodeSet:
    """A code set closed under the hierarchy: each code plus its category and chapter (hierarchical F1)."""
    return frozenset(x for c in codes_ for x in (c, "cat:" + _category_key(c), "chap:" + _chapter_key(c)))


def _codeset(items: Collection[str]) -> CodeSet:
    if isinstance(items, str | bytes):
        raise TypeError(f"expected a collection of codes, got the string {items!r}; wrap it in a list")
    return frozenset(c for c in map(_normalize, items) if c)


def _div(num: float, den: float) -> float:
    return num / den if den else 0.0


def _prf_sets(pred: CodeSet, gold: CodeSet) -> tuple[float, float, float]:
    tp = len(pred & gold)
    return _div(tp, len(pred)), _div(tp, len(gold)), _div(2 * tp, len(pred) + len(gold))


def prf(pred: Collection[str], gold: Collection[str]) -> tuple[float, float, float]:
    """Per-admission (precision, recall, F1) of the normalised code sets.

    Zero denominators give 0.0 (scikit-learn `zero_division=0`): both sets empty -> (0, 0, 0).
    """
    return _prf_sets(_codeset(pred), _codeset(gold))


def _check_lengths(a: Sequence[object], b: Sequence[object], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what} has {len(a)} admissions but golds has {len(b)}; they must align 1:1")


def _sample(pairs: Sequence[tuple[CodeSet, CodeSet]]) -> tuple[float, float, float]:
    if not pairs:
        return 0.0, 0.0, 0.0
    sp = sr = sf = 0.0
    for p, g in pairs:
        a, b, c = _prf_sets(p, g)
        sp += a
        sr += b
        sf += c
    n = len(pairs)
    return sp / n, sr / n, sf / n


def _micro(pairs: Iterable[tuple[CodeSet, CodeSet]]) -> tuple[float, float, float]:
    tp = n_pred = n_gold = 0
    for p, g in pairs:
        tp += len(p & g)
        n_pred += len(p)
        n_gold += len(g)
    return _div(tp, n_pred), _div(tp, n_gold), _div(2 * tp, n_pred + n_gold)


def _macro_f1(pairs: Iterable[tuple[CodeSet, CodeSet]]) -> float:
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    for p, g in pairs:
        tp.update(p & g)
        n_pred.update(p)
        n_gold.update(g)
    labels = n_pred.keys() | n_gold.keys()
    if not labels:
        return 0.0
    return sum(_div(2 * tp[c], n_pred[c] + n_gold[c]) for c in labels) / len(labels)


def _mapped(
    pairs: Sequence[tuple[CodeSet, CodeSet]], key: Callable[[str], str]
) -> list[tuple[CodeSet, CodeSet]]:
    return [(frozenset(map(key, p)), frozenset(map(key, g))) for p, g in pairs]


def _restricted(
    pairs: Sequence[tuple[CodeSet, CodeSet]], counts: Mapping[str, int], lo: int, hi: float
) -> list[tuple[CodeSet, CodeSet]]:
    def inside(c: str) -> bool:
        return lo <= counts.get(c, 0) <= hi

    return [(frozenset(filter(inside, p)), frozenset(filter(inside, g))) for p, g in pairs]


def score(
    predictions: Sequence[Collection[str]],
    golds: Sequence[Collection[str]],
    *,
    codebook: codes.Codebook | None = None,
    train_counts: Mapping[str, int] | None = None,
    rare_max: int = 10,
) -> dict[str, float]:
    """Score aligned predictions against gold code sets (one collection of codes per admission).

    Returns `n`, sample/micro precision-recall-F1, `macro_f1`, category- and chapter-level sample and
    micro F1, `hierarchical_f1` (micro-F1 of the sets extended with their category and chapter), `invalid_rate`, `empty_rate`, `mean_predicted`, `mean_gold`. With `train_counts`
    (code -> training frequency, e.g. from `code_frequencies`) also `{rare,frequent,unseen}_micro_f1`
    and `{...}_support` (gold codes in the bucket): rare = 1..rare_max occurrences, frequent =
    more, unseen = none. A bucket's F1 drops every code outside it from both sides; an empty bucket
    scores 0.0 with support 0.

    Raises ValueError if the two sequences differ in length.
    """
    _check_lengths(predictions, golds, "predictions")
    book = codebook if codebook is not None else codes.DEFAULT
    pairs = [(_codeset(p), _codeset(g)) for p, g in zip(predictions, golds, strict=True)]
    n = len(pairs)

    sp, sr, sf = _sample(pairs)
    mp, mr, mf = _micro(pairs)
    cat = _mapped(pairs, _category_key)
    chap = _mapped(pairs, _chapter_key)

    validity: dict[str, bool] = {}
    n_pred = n_invalid = n_gold = n_empty = 0
    for p, g in pairs:
        n_pred += len(p)
        n_gold += len(g)
        n_empty += not p
        for c in p:
            ok = validity.get(c)
            if ok is None:
                ok = validity[c] = book.is_valid(c)
            n_invalid += not ok

    out: dict[str, float] = {
        "n": n,
        "sample_precision": sp,
        "sample_recall": sr,
        "sample_f1": sf,
        "micro_precision": mp,
        "micro_recall": mr,
        "micro_f1": mf,
        "macro_f1": _macro_f1(pairs),
        "category_sample_f1": _sample(cat)[2],
        "category_micro_f1": _micro(cat)[2],
        "chapter_sample_f1": _sample(chap)[2],
        "chapter_micro_f1": _micro(chap)[2],
        # hierarchical micro-F1 (Kiritchenko et al.): both sets extended with their ancestors
        "hierarchical_f1": _micro([(_with_ancestors(p), _with_ancestors(g)) for p, g in pairs])[2],
        "invalid_rate": _div(n_invalid, n_pred),
        "empty_rate": _div(n_empty, n),
        "mean_predicted": _div(n_pred, n),
        "mean_gold": _div(n_gold, n),
    }

    if train_counts is not None:
        counts: Counter[str] = Counter()
        for code, k in train_counts.items():
            c = _normalize(code)
            if c:
                counts[c] += int(k)
        buckets = {"rare": (1, rare_max), "frequent": (rare_max + 1, math.inf), "unseen": (0, 0)}
        for name, (lo, hi) in buckets.items():
            sub = _restricted(pairs, counts, lo, hi)
            out[f"{name}_micro_f1"] = _micro(sub)[2]
            out[f"{name}_support"] = sum(len(g) for _, g in sub)
    return out


def precision_at_k(ranked: Sequence[Sequence[str]], golds: Sequence[Collection[str]], k: int) -> float:
    """Mean over admissions of |top-k ∩ gold| / k (the denominator is always k, as in P@8 / P@15).

    Ranked lists are normalised and de-duplicated (first occurrence kept) before taking the top k.
    An empty input gives 0.0. Raises ValueError for k < 1 or mismatched lengths.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_lengths(ranked, golds, "ranked")
    if not ranked:
        return 0.0
    total = 0.0
    for r, g in zip(ranked, golds, strict=True):
        if isinstance(r, str | bytes):
            raise TypeError(f"expected a ranked sequence of codes, got the string {r!r}")
        top = [c for c in dict.fromkeys(map(_normalize, r)) if c][:k]
        total += len(_codeset(g).intersection(top)) / k
    return total / len(ranked)


def per_admission_f1(predictions: Sequence[Collection[str]], golds: Sequence[Collection[str]]) -> list[float]:
    """F1 of each admission (the terms whose mean is sample-F1)."""
    _check_lengths(predictions, golds, "predictions")
    return [_prf_sets(_codeset(p), _codeset(g))[2] for p, g in zip(predictions, golds, strict=True)]


def _resample_means(values: Sequence[float], iters: int, seed: int) -> list[float]:
    """Sorted means of `iters` resamples (numpy's PCG64 with `seed`; 200 resamples drawn at a time)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    v = np.asarray(values, dtype=np.float64)
    means: list[float] = []
    for lo in range(0, iters, 200):
        idx = rng.integers(0, len(v), size=(min(200, iters - lo), len(v)))
        means += v[idx].mean(axis=1).tolist()
    return sorted(means)


def _percentiles(means: list[float], alpha: float) -> tuple[float, float]:
    lo = means[math.floor(alpha / 2 * (len(means) - 1))]
    hi = means[math.ceil((1 - alpha / 2) * (len(means) - 1))]
    return lo, hi


def bootstrap_ci(
    values: Sequence[float], iters: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling admissions with replacement)."""
    if not values:
        return 0.0, 0.0
    return _percentiles(_resample_means(list(values), iters, seed), alpha)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(mean(b - a), lower, upper): two models scored on the same admissions, resampled as pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs aligned scores, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    if not diffs:
        return 0.0, 0.0, 0.0
    lo, hi = _percentiles(_resample_means(diffs, iters, seed), alpha)
    return sum(diffs) / len(diffs), lo, hi


def code_frequencies(golds: Iterable[Collection[str]]) -> dict[str, int]:
    """Code -> number of admissions whose (normalised) gold set contains it."""
    counts: Counter[str] = Counter()
    for g in golds:
        counts.update(_codeset(g))
    return dict(counts)


def _cell(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """A GitHub-markdown table: one row per model name, one column per metric.

    Floats print with 3 decimals, integers as integers; missing or NaN values print as '–'.
    """
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, metrics in rows.items():
        cells = [_cell(metrics.get(col)) for col in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
