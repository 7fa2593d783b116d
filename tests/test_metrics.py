"""Tests for icdray.metrics: agreement with scikit-learn, hand cases, normalisation, validity, buckets."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_fscore_support, precision_score, recall_score
from sklearn.preprocessing import MultiLabelBinarizer

from icdray import codes, metrics

REAL = [
    "N17.9",
    "E11.9",
    "I10",
    "E78.5",
    "I25.10",
    "J44.9",
    "F32.9",
    "K21.9",
    "N18.30",
    "I48.91",
    "Z79.4",
    "Z87.891",
    "D62",
    "E03.9",
]


def _spell(rng: random.Random, code: str) -> str:
    """A random MIMIC-like or sloppy spelling of a code."""
    return rng.choice([code, code.replace(".", ""), code.lower(), f" {code} "])


def _random_case(rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    universe = rng.sample(REAL, rng.randint(2, len(REAL)))
    n = rng.randint(1, 12)
    preds: list[list[str]] = []
    golds: list[list[str]] = []
    for _ in range(n):
        g = rng.sample(universe, rng.randint(0, min(5, len(universe))))
        p = [] if rng.random() < 0.2 else rng.sample(universe, rng.randint(0, min(6, len(universe))))
        if p and rng.random() < 0.3:
            p.append(p[0])  # a duplicate must not count twice
        preds.append([_spell(rng, c) for c in p])
        golds.append([_spell(rng, c) for c in g])
    if not any(preds) and not any(golds):
        golds[0] = [universe[0]]  # sklearn needs at least one label
    return preds, golds


def _sklearn(
    preds: list[list[str]], golds: list[list[str]], weights: list[float] | None = None
) -> dict[str, float]:
    p = [{codes.normalize(c) for c in x} for x in preds]
    g = [{codes.normalize(c) for c in x} for x in golds]
    mlb = MultiLabelBinarizer().fit(g + p)
    n_labels = len(mlb.classes_)
    # an all-zero padding column keeps a one-label universe multilabel (sklearn reads a single
    # column as binary); it changes no per-sample or micro count and macro is limited to real labels
    yp = np.hstack([mlb.transform(p), np.zeros((len(p), 1), dtype=int)])
    yt = np.hstack([mlb.transform(g), np.zeros((len(g), 1), dtype=int)])
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for avg in ("samples", "micro", "macro"):
            key = "sample" if avg == "samples" else avg
            kw = {"average": avg, "zero_division": 0, "sample_weight": weights}
            if avg == "macro":
                kw["labels"] = list(range(n_labels))
            if weights is None:  # the three public functions the brief names
                prec, rec, f1 = (
                    precision_score(yt, yp, **kw),
                    recall_score(yt, yp, **kw),
                    f1_score(yt, yp, **kw),
                )
            else:  # one call instead of three (the same code path underneath)
                prec, rec, f1, _ = precision_recall_fscore_support(yt, yp, **kw)
            out[f"{key}_precision"], out[f"{key}_recall"], out[f"{key}_f1"] = prec, rec, f1
            if weights is not None:
                break  # per-row check only needs the samples average
    return out


def test_matches_sklearn_on_random_cases() -> None:
    rng = random.Random(20240601)
    keys = [
        "sample_precision",
        "sample_recall",
        "sample_f1",
        "micro_precision",
        "micro_recall",
        "micro_f1",
        "macro_f1",
    ]
    saw_empty_pred = saw_both_empty = False
    for _ in range(60):
        preds, golds = _random_case(rng)
        saw_empty_pred |= any(not p for p in preds)
        saw_both_empty |= any(not p and not g for p, g in zip(preds, golds, strict=True))
        ours = metrics.score(preds, golds)
        ref = _sklearn(preds, golds)
        for k in keys:
            assert ours[k] == pytest.approx(ref[k], abs=1e-12), (k, preds, golds)
        for i, (p, g) in enumerate(zip(preds, golds, strict=True)):
            # sklearn's own per-row value: the samples average with all weight on row i
            one = _sklearn(preds, golds, weights=[float(j == i) for j in range(len(preds))])
            got = metrics.prf(p, g)
            want = (one["sample_precision"], one["sample_recall"], one["sample_f1"])
            assert got == pytest.approx(want, abs=1e-12), (i, p, g)
    assert saw_empty_pred and saw_both_empty


def test_zero_division_convention_matches_sklearn() -> None:
    # both empty, pred empty, gold empty: all zero, and such rows still count in the sample mean
    assert metrics.prf([], []) == (0.0, 0.0, 0.0)
    assert metrics.prf([], ["I10"]) == (0.0, 0.0, 0.0)
    assert metrics.prf(["I10"], []) == (0.0, 0.0, 0.0)
    s = metrics.score([["I10"], []], [["I10"], []])
    assert s["sample_f1"] == pytest.approx(0.5)
    assert s["micro_f1"] == 1.0 and s["macro_f1"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert f1_score([[1, 0], [0, 0]], [[1, 0], [0, 0]], average="samples", zero_division=0) == 0.5
    nothing = metrics.score([[], []], [[], []])
    assert nothing["micro_f1"] == nothing["macro_f1"] == nothing["sample_f1"] == 0.0
    assert nothing["invalid_rate"] == 0.0 and nothing["empty_rate"] == 1.0


def test_hand_cases_levels() -> None:
    perfect = metrics.score([["N17.9", "I10"]], [["I10", "N17.9"]])
    for k in ("sample_f1", "micro_f1", "macro_f1", "category_micro_f1", "chapter_sample_f1"):
        assert perfect[k] == 1.0, k

    disjoint = metrics.score([["J44.9"]], [["N17.9"]])
    assert disjoint["sample_f1"] == disjoint["micro_f1"] == disjoint["macro_f1"] == 0.0
    assert disjoint["category_sample_f1"] == disjoint["chapter_micro_f1"] == 0.0

    near = metrics.score([["N17.0"]], [["N17.9"]])
    assert near["sample_f1"] == near["micro_f1"] == 0.0
    assert near["category_sample_f1"] == near["category_micro_f1"] == 1.0

    same_chapter = metrics.score([["I10"]], [["I25.10"]])
    assert same_chapter["category_micro_f1"] == 0.0
    assert same_chapter["chapter_sample_f1"] == same_chapter["chapter_micro_f1"] == 1.0

    # partial: pred {I10, J44.9}, gold {I10, N17.9, E11.9}: P=1/2, R=1/3, F1=2/5
    p, r, f = metrics.prf(["I10", "J44.9"], ["I10", "N17.9", "E11.9"])
    assert (p, r, f) == pytest.approx((0.5, 1 / 3, 0.4))


def test_unknown_chapter_counts_as_wrong() -> None:
    s = metrics.score([["I10", "XYZ.1"]], [["I25.10"]])
    # chapter level: {9, unknown} vs {9}: tp=1, 2 predicted, 1 gold
    assert s["chapter_micro_f1"] == pytest.approx(2 / 3)
    assert metrics.score([["XYZ.1"]], [["N17.9"]])["chapter_sample_f1"] == 0.0


def test_normalisation_and_duplicates() -> None:
    assert metrics.prf(["N179"], ["N17.9"]) == (1.0, 1.0, 1.0)
    assert metrics.prf([" n17.9 ", "N179", "N17.9", ""], ["N17.9"]) == (1.0, 1.0, 1.0)
    s = metrics.score([["N179", "N17.9", "I10"]], [["N17.9"]])
    assert s["micro_precision"] == 0.5 and s["mean_predicted"] == 2.0
    assert metrics.code_frequencies([["N179", "N17.9"], ["n17.9", "I10"], []]) == {"N17.9": 2, "I10": 1}


def test_invalid_rate_and_codebook() -> None:
    s = metrics.score([["XYZ.1", "E11", "E11.9", "e119"], []], [["E11.9"], ["I10"]])
    assert s["invalid_rate"] == pytest.approx(2 / 3)  # deduped: XYZ.1 and the category E11 invalid
    assert s["empty_rate"] == 0.5
    assert metrics.score([["E87.2", "I10"]], [["I10"]])["invalid_rate"] == 0.5
    book = codes.Codebook({"E87.2": "Acidosis"})
    assert metrics.score([["E87.2", "I10"]], [["I10"]], codebook=book)["invalid_rate"] == 0.0


def test_frequency_buckets() -> None:
    train = {"N179": 3, "I10": 50, "E11.9": 10, "E78.5": 11}  # undotted key must normalise
    preds = [["N17.9", "I10", "J44.9"], ["E11.9", "E78.5"]]
    golds = [["N17.9", "I10", "F32.9"], ["E78.5", "K21.9"]]
    s = metrics.score(preds, golds, train_counts=train, rare_max=10)
    # rare = {N17.9, E11.9}: pred {N17.9},{E11.9}; gold {N17.9},{} -> tp1 p2 g1 -> 2/3
    assert s["rare_micro_f1"] == pytest.approx(2 / 3) and s["rare_support"] == 1
    # frequent = {I10, E78.5}: all hit
    assert s["frequent_micro_f1"] == 1.0 and s["frequent_support"] == 2
    # unseen: pred {J44.9}, gold {F32.9, K21.9} -> 0
    assert s["unseen_micro_f1"] == 0.0 and s["unseen_support"] == 2
    empty_bucket = metrics.score([["I10"]], [["I10"]], train_counts={"I10": 99})
    assert empty_bucket["rare_micro_f1"] == 0.0 and empty_bucket["rare_support"] == 0
    assert "rare_micro_f1" not in metrics.score([["I10"]], [["I10"]])


def test_precision_at_k() -> None:
    ranked = [["I10", "N179", "N17.9", "J44.9", "E11.9"], ["D62"]]
    golds = [["N17.9", "E11.9"], ["D62", "I10"]]
    # admission 1 top-2 after dedupe: I10, N17.9 -> 1/2; admission 2: D62 -> 1/2 (denominator is k)
    assert metrics.precision_at_k(ranked, golds, 2) == pytest.approx(0.5)
    # top-4: I10, N17.9, J44.9, E11.9 -> 2/4; D62 -> 1/4
    assert metrics.precision_at_k(ranked, golds, 4) == pytest.approx((0.5 + 0.25) / 2)
    with pytest.raises(ValueError):
        metrics.precision_at_k(ranked, golds, 0)


def test_format_table() -> None:
    rows = {"baseline": {"sample_f1": 0.12345, "micro_f1": 0.5}, "sft": {"sample_f1": float("nan"), "n": 3}}
    table = metrics.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| model |") and "sample_f1" in lines[0] and "macro_f1" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert len(lines) == 2 + len(rows)
    assert "| baseline | 0.123 | 0.500 | –" in table
    assert lines[3].startswith("| sft | – |")
    custom = metrics.format_table(rows, columns=["n"])
    assert custom.splitlines()[-1] == "| sft | 3 |"


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="2 admissions"):
        metrics.score([["I10"], []], [["I10"]])
    with pytest.raises(ValueError):
        metrics.precision_at_k([["I10"]], [], 1)
    with pytest.raises(TypeError):
        metrics.score(["I10"], [["I10"]])  # a bare string is not a code set


def test_score_keys_and_types() -> None:
    s = metrics.score([["I10"]], [["I10"]], train_counts={})
    for k in (
        "n",
        "sample_precision",
        "sample_recall",
        "sample_f1",
        "micro_precision",
        "micro_recall",
        "micro_f1",
        "macro_f1",
        "category_sample_f1",
        "category_micro_f1",
        "chapter_sample_f1",
        "chapter_micro_f1",
        "invalid_rate",
        "empty_rate",
        "mean_predicted",
        "mean_gold",
        "rare_micro_f1",
        "frequent_micro_f1",
        "unseen_micro_f1",
        "rare_support",
        "frequent_support",
        "unseen_support",
    ):
        assert k in s and not math.isnan(s[k]), k
    assert s["n"] == 1 and s["unseen_micro_f1"] == 1.0


def test_hierarchical_f1_by_hand() -> None:
    # extended sets: {I10, cat I10, chap IX, E11.9, cat E11, chap IV} vs the same with E11.65: 5 of 6 shared
    s = metrics.score([["I10", "E11.9"]], [["I10", "E11.65"]])
    assert s["hierarchical_f1"] == pytest.approx(5 / 6) and s["micro_f1"] == pytest.approx(0.5)
    assert metrics.score([["J18.9"]], [["I10"]])["hierarchical_f1"] == 0.0


def test_bootstrap_matches_a_hand_computation():
    import numpy as np

    values = [0.0, 0.5, 1.0, 0.25, 0.75]
    lo, hi = metrics.bootstrap_ci(values, iters=400, seed=3)
    rng = np.random.default_rng(3)  # the same draws, by hand: 200 resamples at a time
    means = []
    for _ in range(2):
        idx = rng.integers(0, 5, size=(200, 5))
        means += [sum(values[i] for i in row) / 5 for row in idx]
    means.sort()
    assert (lo, hi) == pytest.approx((means[int(0.025 * 399)], means[int(np.ceil(0.975 * 399))]))
    assert lo < sum(values) / 5 < hi


def test_paired_bootstrap_sees_a_consistent_gain_that_unpaired_noise_would_hide():
    import random

    rng = random.Random(0)
    a = [rng.random() for _ in range(60)]  # widely spread per-admission scores
    b = [x + 0.05 for x in a]  # the same admissions, each 0.05 better
    delta, lo, hi = metrics.paired_bootstrap(a, b)
    assert delta == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    ua, ub = metrics.bootstrap_ci(a), metrics.bootstrap_ci(b)
    assert ua[1] > ub[0]  # the two unpaired intervals overlap
    with pytest.raises(ValueError, match="aligned"):
        metrics.paired_bootstrap([1.0], [1.0, 2.0])
