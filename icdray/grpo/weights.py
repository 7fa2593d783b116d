"""Weight sync by broadcast: learner rank 0 sends the merged policy to every rollout engine in one collective.

    learner rank 0 --export (merged HF state dict)--> buckets of <= bucket_mb, one dtype each
        --broadcast over a process group (gloo on CPU, NCCL on GPU)--> every RolloutWorker
        --engine.load--> vLLM's weights

`grpo.weight_sync` chooses between this and the object store (the learner's state dict put once and pulled
by every worker). The object store copies the weights through shared memory and, across nodes, the
network twice; at 4B parameters (8 GB in bf16) that dominates a step. A broadcast sends each byte once
per link, and with NCCL it stays on the GPUs.

The group is private to the sync (a `ProcessGroupGloo`/`ProcessGroupNCCL` built on its own TCPStore), so
it never touches the default process group DeepSpeed owns in the learner. The parameter list (names,
shapes, dtypes) is fixed for a run: the learner sends it once, through Ray, when the group is formed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

__all__ = ["Channel", "ParamMeta", "buckets"]


@dataclass(frozen=True)
class ParamMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"


def buckets(meta: list[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of `meta` grouped into consecutive buckets of one dtype and at most `bucket_bytes` each (a
    tensor larger than the bucket gets one of its own). Pure: both ends compute the same buckets."""
    import torch

    out: list[list[int]] = []
    size, dtype = 0, None
    for i, m in enumerate(meta):
        n = _numel(m.shape) * torch.empty((), dtype=getattr(torch, m.dtype)).element_size()
        if out and m.dtype == dtype and size + n <= bucket_bytes:
            out[-1].append(i)
            size += n
        else:
            out.append([i])
            size, dtype = n, m.dtype
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Channel:
    """One member of the sync group: rank 0 is the learner, ranks 1.. the rollout workers."""

    def __init__(
        self,
        address: str,
        rank: int,
        world: int,
        backend: str,
        bucket_mb: int = 256,
        timeout_s: float = 600.0,
    ) -> None:
        import torch
        import torch.distributed as dist

        host, port = address.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.PrefixStore(
            "icdray-weights", dist.TCPStore(host, int(port), world, rank == 0, timeout=timeout)
        )
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(store, rank, world)
        elif backend == "gloo":
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(store, rank, world, timeout)
        else:
            raise ValueError(f"grpo.weight_backend must be gloo or nccl, got {backend!r}")
        self.rank, self.world, self.bucket_bytes = rank, world, bucket_mb << 20

    def _broadcast(self, flat: Any) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([flat], opts).wait()

    def send(self, state: dict[str, Any], meta: list[ParamMeta]) -> int:
        """Rank 0: broadcast `state` in `meta`'s order; returns the bytes sent."""
        import torch

        sent = 0
        for idx in buckets(meta, self.bucket_bytes):
            flat = torch.cat([state[meta[i].name].detach().reshape(-1) for i in idx]).to(self.device)
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, meta: list[ParamMeta]) -> dict[str, Any]:
        """Ranks 1..: the state dict rank 0 sent, as tensors on this member's device."""
        import torch

        out: dict[str, Any] = {}
        for idx in buckets(meta, self.bucket_bytes):
            dtype = getattr(torch, meta[idx[0]].dtype)
            flat = torch.empty(sum(_numel(meta[i].shape) for i in idx), dtype=dtype, device=self.device)
            self._broadcast(flat)
            for i, part in zip(idx, flat.split([_numel(meta[i].shape) for i in idx]), strict=True):
                out[meta[i].name] = part.view(meta[i].shape)
        return out


def describe(state: dict[str, Any]) -> list[ParamMeta]:
    return [ParamMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]
