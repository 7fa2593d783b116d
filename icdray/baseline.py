"""First baseline: TF-IDF + one-vs-rest logistic regression (scikit-learn), scored by `metrics`.

Trained on the train split (note text plus the medication list), one global probability threshold
tuned on val for sample-F1 (the headline metric), scored on test. Codes seen fewer than
`min_code_count` times in train get no classifier; they still count as misses, so the comparison
with LLM coders is fair. The ranked probabilities give P@k as well.

Left out: per-code thresholds (they overfit rare codes on small data), label-tree or
hierarchy-aware classifiers, and any use of the ICD descriptions.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from icdray import metrics, prepare, storage
from icdray.config import BaselineConfig

log = logging.getLogger(__name__)
MODEL_NAME = "tfidf-logreg"


def _texts(table: Any) -> list[str]:
    notes = table["note"].to_pylist()
    meds = table["medications"].to_pylist()
    return [f"{n}\nMedications: {'; '.join(m or [])}" for n, m in zip(notes, meds, strict=True)]


def _predict(probs: np.ndarray, labels: np.ndarray, threshold: float) -> list[list[str]]:
    """Codes above the threshold; the single most likely code when none is (never an empty answer)."""
    out = []
    for row in probs:
        idx = np.flatnonzero(row >= threshold)
        if idx.size == 0:
            idx = np.array([int(row.argmax())])
        out.append([str(c) for c in labels[idx[np.argsort(-row[idx])]]])
    return out


def train_and_score(cfg: BaselineConfig, storage_root: str) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    start = time.time()
    cols = ["hadm_id", "note", "medications", "codes"]
    train, val, test = (prepare.read_split(storage_root, s, cols) for s in prepare.SPLITS)
    if min(train.num_rows, val.num_rows, test.num_rows) == 0:
        raise ValueError(
            f"baseline needs non-empty train/val/test splits under {storage_root}/prompts "
            f"(got {train.num_rows}/{val.num_rows}/{test.num_rows}); prepare more admissions"
        )
    train_codes = train["codes"].to_pylist()
    counts = metrics.code_frequencies(train_codes)
    kept = sorted(c for c, n in counts.items() if n >= cfg.min_code_count)
    mlb = MultiLabelBinarizer(classes=kept)
    modelled = set(kept)
    y = mlb.fit_transform([[c for c in codes if c in modelled] for codes in train_codes])
    vec = TfidfVectorizer(
        max_features=cfg.max_features,
        ngram_range=(1, cfg.ngram_max),
        sublinear_tf=True,
        min_df=2,
        token_pattern=r"(?u)\b\w[\w.]*\b",
    )
    x_train = vec.fit_transform(_texts(train))
    x_train.sum_duplicates()  # canonical CSR: joblib workers get a read-only memmap and cannot sort it
    clf = OneVsRestClassifier(
        LogisticRegression(C=cfg.C, solver="liblinear", max_iter=200), n_jobs=cfg.n_jobs
    )
    log.info("baseline: fitting %d code classifiers on %d admissions", len(kept), train.num_rows)
    clf.fit(x_train, y)
    labels = np.array(kept)
    val_probs = clf.predict_proba(vec.transform(_texts(val)))
    val_gold = val["codes"].to_pylist()
    grid = [round(t, 2) for t in np.arange(0.05, 0.95, 0.05)]
    val_f1 = {t: metrics.score(_predict(val_probs, labels, t), val_gold)["sample_f1"] for t in grid}
    threshold = max(val_f1, key=lambda t: (val_f1[t], -t))
    test_probs = clf.predict_proba(vec.transform(_texts(test)))
    preds = _predict(test_probs, labels, threshold)
    gold = test["codes"].to_pylist()
    ranked = [[str(c) for c in labels[np.argsort(-row)[:15]]] for row in test_probs]
    report_path = storage.join(storage_root, "prompts", "_report.json")
    prep = storage.read_json(report_path) if storage.exists(report_path) else {}
    scores = metrics.score(preds, gold, train_counts=counts, rare_max=cfg.rare_max)
    scores.update({f"p_at_{k}": metrics.precision_at_k(ranked, gold, k) for k in (5, 8, 15)})
    return {
        "model": MODEL_NAME,
        "split": "test",
        "threshold": threshold,
        "val_sample_f1": val_f1[threshold],
        "n_train": train.num_rows,
        "n_codes_modelled": len(kept),
        "n_codes_train": len(counts),
        "keep_discharge_diagnosis": prep.get("keep_discharge_diagnosis", False),
        "metrics": scores,
        "seconds": round(time.time() - start, 1),
        "examples": [
            {"hadm_id": h, "gold": g, "predicted": p}
            for h, g, p in zip(test["hadm_id"].to_pylist()[:3], gold[:3], preds[:3], strict=True)
        ],
        "config": cfg.__dict__,
        "top_train_codes": Counter(counts).most_common(10),
    }


def run(cfg: BaselineConfig, storage_root: str, out_dir: str) -> dict[str, Any]:
    result = train_and_score(cfg, storage_root)
    storage.write_json(storage.join(out_dir, f"{MODEL_NAME}.json"), result)
    return result
