"""The engine interface: one spec for every prompt, or one spec per prompt decoded as one batch."""

from __future__ import annotations

import pytest

from icdray import models
from icdray.config import EngineConfig
from icdray.engine import SamplingSpec, make_engine, per_prompt


def test_per_prompt_repeats_one_spec_and_checks_a_list():
    one = SamplingSpec(max_tokens=3)
    assert per_prompt(one, [[1], [2]]) == [one, one]
    with pytest.raises(ValueError, match="2 sampling specs for 3 prompts"):
        per_prompt([one, one], [[1], [2], [3]])


def test_mixed_specs_decode_each_prompt_under_its_own_spec():
    eng = make_engine(models.resolve("tiny"), EngineConfig(backend="hf", threads=1))
    prompt = eng.tok("Patient with chest pain and AKI.")["input_ids"]
    short, long = (SamplingSpec(temperature=0.0, max_tokens=k, constrained=False) for k in (3, 9))
    mixed = eng.generate([prompt, prompt], [short, long])
    alone = [eng.generate([prompt], s)[0][0] for s in (short, long)]
    assert [len(g[0].token_ids) for g in mixed] == [len(a.token_ids) for a in alone]
    assert [g[0].token_ids for g in mixed] == [a.token_ids for a in alone]
    assert len(mixed[0][0].token_ids) <= 3 < len(mixed[1][0].token_ids) <= 9
