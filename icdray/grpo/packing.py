"""Learner batch layouts as pure tensor functions: the shared-prefix pack and the padded (unshared) batch.

A coding prompt is long (a discharge note) and its G answers are short, so scoring every answer with
its own copy of the prompt spends most of the update recomputing the same note. Two shared-prefix
layouts run the prompt once per group, and the prompt's activations receive the gradients of all G
answers (the same sum the padded layout computes G times):

`share` (`grpo.prefix_layout: cache`, the default): the prompt's forward pass returns its KV cache,
which is broadcast to the G answers; the answers then run as a (G, T) batch on top of it. Attention
costs G*T*(P+T): nothing is computed for masked-out blocks. Needs gradient checkpointing off
(recomputing a layer would append to the cache twice).

`pack` (`grpo.prefix_layout: mask`) puts one group in one row:

    row       = prompt (P tokens) | completion 1 (T1) | completion 2 (T2) | ...
    positions = 0 .. P-1          | P .. P+T1-1       | P .. P+T2-1       | ...   (restart per completion)
    mask      = every completion token sees the prompt and the earlier tokens of its own completion only

The mask is a 4-D boolean (1, 1, L, L) tensor, which transformers passes to SDPA unchanged; it works
with gradient checkpointing, but dense attention computes the (L x L) blocks it masks out (on CPU,
SDPA's masked path makes this layout slower than `share` for G x T >> P). A group longer than
`budget` tokens is split into several rows (either layout), each with its own copy of the prompt.

Both layouts give the same `Batch`: where to read logits (`logit_index`, into the flattened row) and
which token each completion position predicts, padded to (K, T) with `completion_mask`.
Left out: packing several groups into one row (rows would need a block-diagonal prompt mask too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    prompt_ids: Sequence[int]  # (P,) chat-templated prompt
    completion_ids: Sequence[int]  # (T,) sampled answer tokens


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, L) rows: one packed group each, or one padded completion each
    position_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, 1, L, L) bool when packed, (R, L) 0/1 when padded
    logit_index: torch.Tensor  # (N,) flat indices into the R*L row positions whose logits are needed
    gather: torch.Tensor  # (K, T) index into the N kept logits for each completion position (0 on padding)
    completion_ids: torch.Tensor  # (K, T) the tokens being scored (pad on padding)
    completion_mask: torch.Tensor  # (K, T) 1.0 on real completion tokens
    members: list[int]  # (K,) which input completion each of the K rows is


def split_group(prompt_len: int, lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Completion indices per packed row: each row holds the prompt plus completions within `budget` tokens.

    A completion that does not fit with the prompt even alone still gets a row of its own.
    """
    rows: list[list[int]] = []
    used = budget  # forces a new row at the first completion
    for i, n in enumerate(lengths):
        if rows and used + n <= budget:
            rows[-1].append(i)
            used += n
        else:
            rows.append([i])
            used = prompt_len + n
    return rows


def pack(items: Sequence[Completion], pad_id: int, budget: int = 4096) -> Batch:
    """Shared-prefix layout. Items with the same prompt (a GRPO group) share a row; order is kept in `members`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it.prompt_ids), []).append(i)
    plans: list[tuple[tuple[int, ...], list[int]]] = []
    for prompt, idx in groups.items():
        for part in split_group(len(prompt), [max(1, len(items[i].completion_ids)) for i in idx], budget):
            plans.append((prompt, [idx[j] for j in part]))
    width = max(len(p) + sum(len(items[i].completion_ids) for i in m) for p, m in plans)
    r = len(plans)
    ids = torch.full((r, width), pad_id, dtype=torch.long)
    pos = torch.zeros((r, width), dtype=torch.long)
    mask = torch.zeros((r, 1, width, width), dtype=torch.bool)
    sources: list[list[int]] = []  # per completion: flat positions whose logits predict its tokens
    members: list[int] = []
    for row, (prompt, member_ids) in enumerate(plans):
        p = len(prompt)
        ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
        pos[row, :p] = torch.arange(p)
        mask[row, 0, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        start = p
        for i in member_ids:
            c = list(items[i].completion_ids)
            t = len(c)
            end = start + t
            if t:
                ids[row, start:end] = torch.tensor(c, dtype=torch.long)
                pos[row, start:end] = torch.arange(p, p + t)
                mask[row, 0, start:end, :p] = True
                mask[row, 0, start:end, start:end] = torch.ones(t, t, dtype=torch.bool).tril()
            # token j of the completion is predicted by the previous position: the prompt's last for j = 0
            base = row * width
            sources.append([base + p - 1] + [base + start + j for j in range(t - 1)] if t else [])
            members.append(i)
            start = end
        # padding rows attend to themselves only, so SDPA never sees a fully masked row
        for q in range(start, width):
            mask[row, 0, q, q] = True
    return _index(ids, pos, mask, sources, [list(items[i].completion_ids) for i in members], members, pad_id)


def pad(items: Sequence[Completion], pad_id: int) -> Batch:
    """Unshared layout (as TRL): prompts left-padded, completions right-padded, one row per completion."""
    p = max(len(it.prompt_ids) for it in items)
    t = max(1, max(len(it.completion_ids) for it in items))
    b = len(items)
    width = p + t
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    sources: list[list[int]] = []
    for i, it in enumerate(items):
        n, m = len(it.prompt_ids), len(it.completion_ids)
        ids[i, p - n : p] = torch.tensor(list(it.prompt_ids), dtype=torch.long)
        if m:
            ids[i, p : p + m] = torch.tensor(list(it.completion_ids), dtype=torch.long)
        attn[i, p - n : p + m] = 1
        sources.append([i * width + p - 1 + j for j in range(m)])
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # every row starts at position 0
    return _index(ids, pos, attn, sources, [list(it.completion_ids) for it in items], list(range(b)), pad_id)


def _index(
    ids: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    sources: list[list[int]],
    targets: list[list[int]],
    members: list[int],
    pad_id: int,
) -> Batch:
    k = len(targets)
    t = max(1, max(len(x) for x in targets))
    flat = [s for src in sources for s in src]
    gather = torch.zeros((k, t), dtype=torch.long)
    comp = torch.full((k, t), pad_id, dtype=torch.long)
    cmask = torch.zeros((k, t), dtype=torch.float32)
    at = 0
    for row, tgt in enumerate(targets):
        n = len(tgt)
        gather[row, :n] = torch.arange(at, at + n)
        if n:
            comp[row, :n] = torch.tensor(tgt, dtype=torch.long)
        cmask[row, :n] = 1.0
        at += n
    return Batch(ids, pos, mask, torch.tensor(flat, dtype=torch.long), gather, comp, cmask, members)


@dataclass
class SharedBatch:
    """`share`'s layout: per row, one prompt and the completions that read its broadcast KV cache."""

    prompts: list[torch.Tensor]  # R x (P_r,) prompt ids
    completions: list[torch.Tensor]  # R x (G_r, T_r) right-padded completion ids
    lengths: list[list[int]]  # R x G_r real completion lengths
    gather: torch.Tensor  # (K, T) index into the N kept logits (members order, tokens in order)
    completion_ids: torch.Tensor  # (K, T)
    completion_mask: torch.Tensor  # (K, T)
    members: list[int]  # (K,)


def share(items: Sequence[Completion], pad_id: int, budget: int = 4096) -> SharedBatch:
    """The KV-broadcast layout (see the module docstring); same grouping and order as `pack`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it.prompt_ids), []).append(i)
    prompts, comps, lengths, members, targets = [], [], [], [], []
    for prompt, idx in groups.items():
        for part in split_group(len(prompt), [max(1, len(items[i].completion_ids)) for i in idx], budget):
            rows = [list(items[idx[j]].completion_ids) for j in part]
            ids = torch.full((len(rows), max(1, max(len(r) for r in rows))), pad_id, dtype=torch.long)
            for k, r in enumerate(rows):
                if r:
                    ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            prompts.append(torch.tensor(prompt, dtype=torch.long))
            comps.append(ids)
            lengths.append([len(r) for r in rows])
            members += [idx[j] for j in part]
            targets += rows
    flat = _index(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), [], targets, members, pad_id)
    return SharedBatch(
        prompts, comps, lengths, flat.gather, flat.completion_ids, flat.completion_mask, members
    )


def _shared_logits(model: object, batch: SharedBatch) -> torch.Tensor:
    """(N, V) logits predicting every real completion token, in members order."""
    from transformers import DynamicCache

    parts = []
    for prompt, comp, lengths in zip(batch.prompts, batch.completions, batch.lengths, strict=True):
        g, t = comp.shape
        p, dev = prompt.shape[0], comp.device
        head = model(  # type: ignore[operator]
            input_ids=prompt[None],
            position_ids=torch.arange(p, device=dev)[None],
            use_cache=True,
            logits_to_keep=1,
        )
        # the prompt's keys and values, broadcast (a view, no copy) to the G answers; gradients sum back
        kv = [
            (layer.keys.expand(g, -1, -1, -1), layer.values.expand(g, -1, -1, -1))
            for layer in head.past_key_values.layers
        ]
        tail = model(  # type: ignore[operator]
            input_ids=comp,
            attention_mask=torch.ones((g, p + t), dtype=torch.long, device=dev),
            position_ids=(p + torch.arange(t, device=dev))[None].expand(g, -1),
            past_key_values=DynamicCache(ddp_cache_data=kv),
            use_cache=True,
            logits_to_keep=t,
        )
        # token 0 of a completion is predicted by the prompt's last position, token j by its position j-1
        logits = torch.cat(
            [head.logits[:, -1:].expand(g, -1, -1), tail.logits[:, : t - 1]], dim=1
        )  # (G, T, V)
        keep = torch.tensor(
            [k * t + j for k, n in enumerate(lengths) for j in range(n)], dtype=torch.long, device=dev
        )
        parts.append(logits.reshape(g * t, -1).index_select(0, keep))
    return torch.cat(parts)


def to_device(batch: Batch | SharedBatch, device: object) -> Batch | SharedBatch:
    """The same layout with every tensor on `device`."""
    import dataclasses

    def move(x: object) -> object:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [t.to(device) for t in x]
        return x

    return dataclasses.replace(
        batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )


def token_logprobs(
    model: object, batch: Batch | SharedBatch, temperature: float = 1.0, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """(K, T) log-probs of each completion token under `model`; logits are computed only where needed.

    `allowed` (N, V) bool, aligned with `batch.logit_index`: the sampler's token mask at each position
    (constrained decoding); the log-probs are then those of the masked, renormalised distribution.
    """
    logits = _shared_logits(model, batch) if isinstance(batch, SharedBatch) else _packed_logits(model, batch)
    # bf16/fp16 logits are scored in fp32; fp64 (the exactness tests) stays fp64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / (temperature or 1.0)  # (N, V)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)  # (N, V)
    picked = logp.gather(-1, _targets(batch).unsqueeze(-1)).squeeze(-1)  # (N,)
    return picked[batch.gather] * batch.completion_mask  # (K, T), 0 on padding


def _packed_logits(model: object, batch: Batch) -> torch.Tensor:
    """(N, V) logits at `batch.logit_index` (the `pack` and `pad` layouts)."""
    r, width = batch.input_ids.shape
    # logits_to_keep takes positions along one row: rows are scored one at a time when there are several
    parts = []
    for row in range(r):
        lo, hi = row * width, (row + 1) * width
        keep = batch.logit_index[(batch.logit_index >= lo) & (batch.logit_index < hi)] - lo
        if keep.numel() == 0:
            continue
        out = model(  # type: ignore[operator]
            input_ids=batch.input_ids[row : row + 1],
            attention_mask=batch.attention_mask[row : row + 1],
            position_ids=batch.position_ids[row : row + 1],
            logits_to_keep=keep,
            use_cache=False,
        )
        parts.append(out.logits[0])
    return torch.cat(parts)


def _targets(batch: Batch | SharedBatch) -> torch.Tensor:
    """(N,) the token each kept logit position predicts, in `logit_index` order."""
    mask = batch.completion_mask.bool()
    order = batch.gather[mask]
    out = torch.empty(int(mask.sum()), dtype=torch.long)
    out[order] = batch.completion_ids[mask]
    return out
