"""The TF-IDF and sentence-encoder baselines train on train, tune on val, and are scored on test by the one
scorer."""

import json

import pytest

from icdray import baseline, metrics, prepare
from icdray.config import BaselineConfig, PrepareConfig


@pytest.fixture(scope="module")
def prepared(ray_session, demo_root, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    prepare.run(PrepareConfig(), root, demo_root)
    return root


@pytest.mark.parametrize("features", ["tfidf", "encoder"])
def test_baseline_beats_frequency_prior_and_writes_metrics(prepared, tmp_path, features):
    result = baseline.run(BaselineConfig(encoder_max_windows=2), prepared, str(tmp_path), features)
    name = "tfidf-logreg" if features == "tfidf" else "encoder-minilm-logreg"
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"])
    m = result["metrics"]
    assert {"sample_f1", "micro_f1", "macro_f1", "invalid_rate", "p_at_8", "rare_micro_f1"} <= set(m)
    # a baseline that reads the note must beat predicting the k most frequent training codes
    train = prepare.read_split(prepared, "train", ["codes"])["codes"].to_pylist()
    test = prepare.read_split(prepared, "test", ["codes"])["codes"].to_pylist()
    freq = metrics.code_frequencies(train)
    k = round(sum(map(len, train)) / len(train))
    prior = [sorted(freq, key=freq.get, reverse=True)[:k]] * len(test)
    assert m["sample_f1"] > metrics.score(prior, test)["sample_f1"] + 0.1
    assert m["invalid_rate"] == 0.0 and m["empty_rate"] == 0.0
    assert 0.05 <= result["threshold"] <= 0.9


def test_baseline_needs_prepared_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="icdray prepare"):
        baseline.run(BaselineConfig(), str(tmp_path), str(tmp_path / "reports"))


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
