"""GRPO math as pure tensor functions: group-relative advantages, the clipped policy loss, TIS weights.

No Ray, no models: the controller and the learner call these, and tests check them against hand
computations and TRL's published formulas.

Shapes: B completions = P prompts x G samples, laid out prompt-major ([p0s0, p0s1, ..., p1s0, ...]);
T = completion tokens (right-padded, `mask` marks real tokens).

Loss variants (`loss_type`):
- "token" (default): sum over all real tokens of the batch / number of real tokens: every token counts
  the same, so long answers are not down-weighted (DAPO's token-level normalisation).
- "sequence": per-sequence mean, then mean over sequences (the original GRPO paper).
- "dr_grpo": sum / (B * max_completion_length): no length bias at all (Dr. GRPO).
Advantages: (r - group mean) / (group std + eps), or mean-only (`scale=False`, as Dr. GRPO); the
baseline may instead be the reward of the prompt's greedy answer (`baseline=`, as ReMax).
Item credit (`item_advantages`, optional): a coding answer is a list of items, each an evidence quote and a
code, and each item has a reward of its own (its share of the answer's F1, grpo/credit.py). Item rewards
are divided by their standard deviation over the group's items, not centred: zero already means "as good
as not writing the item". A token of an item then gets the answer's advantage plus `weight` x its item's
scaled reward (`token_advantages`), so a wrong code is pushed down inside an answer that scored well.
KL to a reference policy with the k3 estimator, weighted by `beta` (0 by default: no reference model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: bool = True,
    eps: float = 1e-4,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) rewards -> (B,) advantages relative to each prompt's group of `group_size` samples.

    `baseline` (P,): subtracted instead of the group's mean, e.g. the reward of each prompt's greedy
    answer (ReMax's baseline: a sample is pushed up only when it beats what greedy decoding writes)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    if baseline is None:
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        spread = grouped
    else:
        adv = grouped - baseline.view(-1, 1)
        spread = torch.cat([grouped, baseline.view(-1, 1)], dim=1)  # the greedy answer's reward counts too
    if scale:
        adv = adv / (spread.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL
    return adv.reshape(-1)


def item_advantages(item_rewards: list[list[float]], eps: float = 1e-4) -> list[list[float]]:
    """One group's item rewards (per answer, per item) -> r / (std + eps), the std over all the group's items.

    A group with fewer than two items, or whose items all scored the same, gets zeros: no signal."""
    flat = [r for answer in item_rewards for r in answer]
    if len(flat) < 2 or max(flat) == min(flat):
        return [[0.0] * len(answer) for answer in item_rewards]
    mean = sum(flat) / len(flat)
    std = (sum((r - mean) ** 2 for r in flat) / (len(flat) - 1)) ** 0.5  # unbiased, as group_advantages
    return [[r / (std + eps) for r in answer] for answer in item_rewards]


def token_advantages(
    advantage: float, n_tokens: int, spans: list[tuple[int, int]], item_adv: list[float], weight: float
) -> list[float]:
    """(T,) per-token advantages: the answer's `advantage` everywhere, plus `weight` x `item_adv[j]` on the
    tokens [lo, hi) of item j (`spans[j]`)."""
    out = [advantage] * n_tokens
    for (lo, hi), a in zip(spans, item_adv, strict=True):
        for t in range(max(0, lo), min(hi, n_tokens)):
            out[t] += weight * a
    return out


def best_step(val_f1: dict[int, float]) -> int:
    """The step whose weights to keep: the highest validation score, the earliest on a tie, so a GRPO step
    must beat the start model (step 0) on validation to replace it."""
    if not val_f1:
        raise ValueError("no validation scores to choose a step from")
    return max(sorted(val_f1), key=lambda step: val_f1[step])


def zero_variance_groups(
    rewards: torch.Tensor, group_size: int, baseline: torch.Tensor | None = None
) -> torch.Tensor:
    """(P,) True for groups whose samples all scored the same (and the same as `baseline`, when given):
    they carry no learning signal."""
    grouped = rewards.view(-1, group_size)
    flat = (grouped.max(dim=1).values - grouped.min(dim=1).values) == 0
    return flat if baseline is None else flat & (grouped[:, 0] == baseline)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - lp) - (ref - lp) - 1 >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def tis_weights(learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (veRL/TRL's TIS): min(pi_learner / pi_sampler, cap) per token, (B, T).

    Corrects for a sampler whose numerics differ from the learner's (bf16 vLLM vs the training model):
    the samples come from pi_sampler, the objective is written for pi_learner.
    """
    return torch.exp(learner_logprobs.detach() - sampler_logprobs).clamp(max=cap)


@dataclass(frozen=True)
class LossOut:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: float  # share of real tokens whose ratio was clipped
    kl: float  # mean per-token k3 KL (0 without a reference)
    ratio_mean: float


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "token",
    max_completion_length: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOut:
    """Clipped importance-ratio loss. logprobs/old_logprobs/mask/token_weights: (B, T); advantages: (B,)
    (one per answer) or (B, T) (one per token, see `token_advantages`).

    `token_weights` (no gradient) multiply each token's policy term: the truncated importance weights
    of `tis_weights` when the sampler's policy differs from the learner's.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # (B, T)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.min(unclipped, clipped)  # (B, T)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    kl = torch.zeros_like(per_token)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if loss_type == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "sequence":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        length = max_completion_length or logprobs.shape[1]
        loss = (per_token * mask).sum() / (logprobs.shape[0] * length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: token | sequence | dr_grpo")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        return LossOut(
            loss,
            float((was_clipped.to(mask.dtype) * mask).sum() / n),
            float((kl * mask).sum() / n),
            float((ratio * mask).sum() / n),
        )
