"""GRPO advantages and loss against hand-computed values and TRL's published formulas."""

import pytest
import torch

from icdray import training
from icdray.grpo import algo as grpo


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # 2 prompts x 4 samples
    adv = grpo.group_advantages(r, 4, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased: sqrt(1/3)
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(grpo.group_advantages(r, 4, eps=1e-4)[4:], torch.zeros(4))  # no signal in a flat group
    assert torch.allclose(grpo.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert grpo.zero_variance_groups(r, 4).tolist() == [False, True]
    with pytest.raises(ValueError):
        grpo.group_advantages(r, 3)


def test_best_step_keeps_the_start_model_unless_a_step_beats_it():
    assert grpo.best_step({0: 0.50, 4: 0.49}) == 0
    assert grpo.best_step({0: 0.50, 4: 0.50}) == 0  # a tie keeps the earlier weights
    assert grpo.best_step({0: 0.50, 2: 0.55, 4: 0.52}) == 2
    assert grpo.best_step({4: 0.3, 2: 0.3}) == 2
    with pytest.raises(ValueError):
        grpo.best_step({})


def test_loss_matches_trl_formulas():
    torch.manual_seed(0)
    b, t, g = 4, 6, 2
    lp = torch.randn(b, t) * 0.1 - 1.0
    old = lp + torch.randn(b, t) * 0.3
    ref = lp + torch.randn(b, t) * 0.2
    mask = torch.ones(b, t)
    mask[0, 4:] = 0
    mask[3, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.7])
    adv = grpo.group_advantages(rewards, g)
    # TRL GRPOTrainer._compute_loss, written out: coef_1 = exp(lp - old); coef_2 = clamp(coef_1, 1-e, 1+e);
    # per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * (exp(ref - lp) - (ref - lp) - 1)
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 0.8, 1.2)
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None]) + 0.04 * kl
    trl_grpo = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()  # loss_type="grpo"
    trl_bnpo = (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # loss_type="bnpo"
    trl_dr = (per_token * mask).sum() / (b * 8)  # loss_type="dr_grpo", max_completion_length=8
    kw = dict(beta=0.04, ref_logprobs=ref)
    assert torch.allclose(grpo.policy_loss(lp, old, adv, mask, loss_type="sequence", **kw).loss, trl_grpo)
    assert torch.allclose(grpo.policy_loss(lp, old, adv, mask, loss_type="token", **kw).loss, trl_bnpo)
    assert torch.allclose(
        grpo.policy_loss(lp, old, adv, mask, loss_type="dr_grpo", max_completion_length=8, **kw).loss, trl_dr
    )


def test_loss_by_hand_and_clip_fraction():
    lp = torch.log(torch.tensor([[1.5, 1.0]]))  # ratios 1.5 (clipped for A > 0) and 1.0, old logprob 0
    old = torch.zeros(1, 2)
    out = grpo.policy_loss(lp, old, torch.tensor([2.0]), torch.ones(1, 2))
    assert out.loss.item() == pytest.approx(-(1.2 * 2 + 1.0 * 2) / 2)
    assert out.clip_fraction == 0.5 and out.kl == 0.0
    neg = grpo.policy_loss(lp, old, torch.tensor([-2.0]), torch.ones(1, 2))
    assert neg.loss.item() == pytest.approx((1.5 * 2 + 1.0 * 2) / 2)  # pessimistic side: the unclipped term
    assert grpo.k3_kl(lp, lp).abs().max() == 0
    assert (grpo.k3_kl(lp, old) >= 0).all()


def test_gradient_pushes_toward_positive_advantage():
    logits = torch.zeros(2, 3, requires_grad=True)  # two sequences, three tokens
    lp = torch.log_softmax(logits, dim=-1)[:, :1].expand(2, 3)
    out = grpo.policy_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3))
    out.loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[1, 0]  # descent raises the good sample's token, lowers the bad


def test_truncated_importance_weights_and_token_weights():
    learner_lp = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler_lp = torch.tensor([[-1.0, -3.0, -0.1]])
    w = grpo.tis_weights(learner_lp, sampler_lp, cap=2.0)
    want = torch.tensor(
        [[1.0, min(2.0, float(torch.exp(torch.tensor(1.0)))), float(torch.exp(torch.tensor(-0.4)))]]
    )
    assert torch.allclose(w, want)  # exp(1) = 2.72 is capped at 2
    lp = learner_lp.clone().requires_grad_(True)
    mask = torch.ones(1, 3)
    plain = grpo.policy_loss(lp, lp.detach(), torch.tensor([1.0]), mask)
    weighted = grpo.policy_loss(lp, lp.detach(), torch.tensor([1.0]), mask, token_weights=w)
    # ratio 1 everywhere: the per-token term is -A, so the weighted loss is -mean(w)
    assert plain.loss.item() == pytest.approx(-1.0) and weighted.loss.item() == pytest.approx(
        -float(w.mean())
    )


def test_weight_buckets_keep_one_dtype_and_the_size_bound():
    from icdray.grpo.weights import ParamMeta, buckets

    meta = [
        ParamMeta("a", (256,), "float32"),  # 1 KiB
        ParamMeta("b", (256,), "float32"),
        ParamMeta("c", (512,), "bfloat16"),  # 1 KiB, another dtype: a new bucket
        ParamMeta("d", (4096,), "float32"),  # 16 KiB, over the bound: a bucket of its own
        ParamMeta("e", (8,), "float32"),
    ]
    got = buckets(meta, 2048)
    assert got == [[0, 1], [2], [3], [4]]
    assert sorted(i for b in got for i in b) == list(range(len(meta)))  # every tensor once, in order


def test_optimizer_step_sizes():
    """AdamW's first step moves a weight by about lr whatever its gradient; SGD by lr x gradient."""
    grad = torch.tensor([1e-3, 1.0])
    moved = {}
    for name in training.OPTIMIZERS:
        p = torch.nn.Parameter(torch.zeros(2))
        opt = training.optimizer(name, [p], lr=0.1, weight_decay=0.0)
        p.grad = grad.clone()
        opt.step()
        moved[name] = -p.detach()
    assert torch.allclose(moved["sgd"], 0.1 * grad)
    assert torch.allclose(moved["adamw"], torch.tensor([0.1, 0.1]), rtol=1e-3)
    with pytest.raises(ValueError, match="adamw, sgd"):
        training.optimizer("lion", [torch.nn.Parameter(torch.zeros(1))], lr=0.1, weight_decay=0.0)


def test_item_advantages_by_hand():
    got = grpo.item_advantages([[0.2, -0.1], [0.3], [-0.1, -0.1, 0.4]], eps=0.0)
    flat = torch.tensor([0.2, -0.1, 0.3, -0.1, -0.1, 0.4])
    want = (flat / flat.std()).tolist()  # scaled by the std over every item of the group, not centred
    assert [x for answer in got for x in answer] == pytest.approx(want)
    assert grpo.item_advantages([[0.5, 0.5], [0.5]]) == [[0.0, 0.0], [0.0]]  # flat items: no signal
    assert grpo.item_advantages([[], [0.2]]) == [[], [0.0]]


def test_token_advantages_add_item_credit_on_the_item_tokens_only():
    out = grpo.token_advantages(0.5, 8, [(1, 3), (5, 7)], [1.0, -2.0], weight=0.5)
    assert out == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5, -0.5, -0.5, 0.5])


def test_per_token_advantages_in_the_loss():
    """A (B, T) advantage pushes each token its own way: the same loss as (B,) where the rows agree."""
    logits = torch.zeros(1, 2, 3, requires_grad=True)  # one answer, two tokens, vocabulary 3
    lp = torch.log_softmax(logits, dim=-1)[..., 0]  # (1, 2) token 0 sampled at both positions
    out = grpo.policy_loss(lp, lp.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2))
    out.loss.backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 1, 0]  # first token raised, second lowered
    same = grpo.policy_loss(lp, lp.detach(), torch.tensor([[0.7, 0.7]]), torch.ones(1, 2)).loss
    assert same.item() == pytest.approx(
        grpo.policy_loss(lp, lp.detach(), torch.tensor([0.7]), torch.ones(1, 2)).loss.item()
    )


def test_greedy_baseline_replaces_the_group_mean():
    r = torch.tensor([0.2, 0.6, 0.4, 0.4])  # 2 prompts x 2 samples
    greedy = torch.tensor([0.5, 0.4])
    adv = grpo.group_advantages(r, 2, scale=False, baseline=greedy)
    assert torch.allclose(adv, torch.tensor([-0.3, 0.1, 0.0, 0.0]))  # measured against the greedy answer
    scaled = grpo.group_advantages(r, 2, eps=0.0, baseline=greedy)
    assert torch.allclose(scaled[:2], torch.tensor([-0.3, 0.1]) / torch.tensor([0.2, 0.6, 0.5]).std())
    # a group that ties with its greedy answer: no advantage (the spread includes the greedy answer's reward)
    assert torch.equal(grpo.group_advantages(r, 2, baseline=greedy)[2:], torch.zeros(2))
    # a group that ties with its greedy answer carries nothing; one that differs from it does
    assert grpo.zero_variance_groups(r, 2, greedy).tolist() == [False, True]
    assert grpo.zero_variance_groups(torch.tensor([0.4, 0.4]), 2, torch.tensor([0.5])).tolist() == [False]


def test_train_layers_freezes_all_but_the_top_of_the_stack():
    from icdray import models
    from icdray.config import GRPOConfig

    model = training.trainable(models.resolve("tiny"), GRPOConfig(train_layers=1))
    layers = model.get_decoder().layers
    live = [p for p in model.parameters() if p.requires_grad]
    top = [*layers[-1].parameters(), *model.get_decoder().norm.parameters()]
    assert {id(p) for p in live} == {id(p) for p in top}  # the last layer and the final norm, nothing else
    assert not any(p.requires_grad for p in layers[0].parameters())
    # one backward pass: the frozen layers get no gradient, the top layer does
    out = model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]]))
    out.loss.backward()
    assert layers[0].mlp.down_proj.weight.grad is None and layers[-1].mlp.down_proj.weight.grad is not None
    with pytest.raises(ValueError, match="layers"):
        training.trainable(models.resolve("tiny"), GRPOConfig(train_layers=len(layers) + 1))
    with pytest.raises(ValueError, match="exclude"):
        training.trainable(models.resolve("tiny"), GRPOConfig(train_layers=1, lora=True))
