"""The TF-IDF and sentence-encoder baselines train on train, tune on val, and are scored on test by the one
scorer."""

import pytest

from icdray import baseline, layout, metrics, prepare, storage
from icdray.config import BaselineConfig, PrepareConfig


@pytest.fixture(scope="module")
def prepared(ray_session, demo_root, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    prepare.run(PrepareConfig(), root, demo_root)
    return root


@pytest.mark.parametrize("features", ["tfidf", "encoder"])
def test_baseline_beats_frequency_prior_and_writes_metrics(prepared, features):
    result = baseline.run(BaselineConfig(encoder_max_windows=1), prepared, features)
    name = "tfidf-logreg" if features == "tfidf" else "encoder-minilm-logreg"
    saved = storage.read_json(layout.Layout(prepared).report(name))
    assert saved["metrics"] == pytest.approx(result["metrics"]) and saved["role"] == "baseline"
    m = result["metrics"]
    assert {"sample_f1", "micro_f1", "macro_f1", "invalid_rate", "rare_micro_f1"} <= set(
        m
    ) and "p_at_8" in result
    # a baseline that reads the note must beat predicting the k most frequent training codes
    prior = baseline.run(BaselineConfig(), prepared, "prior")
    assert result["sample_f1"] > prior["sample_f1"] + 0.1
    assert m["invalid_rate"] == 0.0 and m["empty_rate"] == 0.0
    assert 0.05 <= result["threshold"] <= 0.9


def test_frequency_prior_is_tuned_on_val(prepared):
    prior = baseline.run(BaselineConfig(), prepared, "prior")
    train = layout.read_split(prepared, "train", ["codes"])["codes"].to_pylist()
    val = layout.read_split(prepared, "val", ["codes"])["codes"].to_pylist()
    freq = metrics.code_frequencies(train)
    ranked = sorted(freq, key=lambda c: (-freq[c], c))
    best = max(range(1, 41), key=lambda k: (metrics.score([ranked[:k]] * len(val), val)["sample_f1"], -k))
    assert prior["k"] == best and prior["codes"] == ranked[:best] and prior["role"] == "prior"


def test_baseline_needs_prepared_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="icdray prepare"):
        baseline.run(BaselineConfig(), str(tmp_path))


def test_encoder_embeds_with_the_real_minilm():
    texts = [
        "The cat sat on the mat.",
        "A feline rested on a rug.",
        "acute kidney injury",
        "acute renal failure",
    ]
    vecs = baseline.embed(texts, max_windows=1)
    assert vecs.shape == (4, 384)
    sims = vecs @ vecs.T
    # sentence-transformers' own pipeline gives 0.55 for the first pair: same weights, same pooling
    assert sims[0, 1] == pytest.approx(0.55, abs=0.01)
    assert sims[2, 3] > 0.8 > 0.1 > sims[0, 2]  # a pretrained encoder: synonyms close, unrelated far
