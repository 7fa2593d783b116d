"""Rollout workers: Ray actors that sample G answers per prompt and take new weights from the learner.

    controller --generate(prompt ids, SamplingSpec)--> RolloutWorker x N
        -> per prompt: G Samples (completion token ids, the sampler's log-prob of each, text)
    learner --export_weights--> object store --update_weights--> every RolloutWorker
            (or --broadcast (gloo | NCCL)--> receive_weights, grpo.weight_sync=broadcast)

Each worker holds one engine (`icdray.engine`: vLLM by default, transformers as the fallback), built
from `grpo.engine`, the same settings record evaluation and Serve use. With constrained rollouts the
engine samples under the answer grammar of the run's label space and returns the log-probs of that
masked distribution; the learner rebuilds the same mask (`grpo/masks.py`).

Weights arrive either through the object store (`update_weights`) or by a broadcast from the learner
(`receive_weights`, gloo on CPU, NCCL on GPU: `grpo/weights.py`). Left out: rollouts that overlap the
update (asynchronous, off-policy).
"""

from __future__ import annotations

import os
import time
from typing import Any

from icdray.config import EngineConfig
from icdray.engine import Sample, SamplingSpec, make_engine
from icdray.grammar import AnswerConstraint

__all__ = ["RolloutWorker", "Sample", "SamplingSpec"]


class RolloutWorker:
    """A Ray actor (wrapped by the controller with its resources) holding one generation engine."""

    def __init__(
        self, model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None = None
    ) -> None:
        t = time.time()
        self.engine = make_engine(model_path, cfg, constraint)
        self.backend = cfg.backend
        self.version = 0  # learner step whose weights this worker holds
        self.counters = {"startup_s": time.time() - t, "tokens": 0, "generate_s": 0.0, "load_s": 0.0}

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[Sample]]:
        t = time.time()
        out = self.engine.generate(prompts, spec)
        self.counters["generate_s"] += time.time() - t
        self.counters["tokens"] += sum(len(s.token_ids) for g in out for s in g)
        return out

    def update_weights(self, weights: dict[str, Any], version: int) -> float:
        """Load a full state dict (HF parameter names) from the learner; returns the seconds it took."""
        t = time.time()
        self.engine.load(weights)
        self.version = version
        self.counters["load_s"] += time.time() - t
        return time.time() - t

    def sleep(self) -> None:
        """Colocated placement: give the GPU to the learner (engines without a sleep mode keep running)."""
        if hasattr(self.engine, "sleep"):
            self.engine.sleep()

    def wake(self) -> None:
        if hasattr(self.engine, "wake"):
            self.engine.wake()

    def open_weight_channel(self, address: str, rank: int, world: int, backend: str, bucket_mb: int) -> None:
        from icdray.grpo.weights import Channel

        self.channel = Channel(address, rank, world, backend, bucket_mb)

    def receive_weights(self, meta: list[Any], version: int) -> float:
        """Take the learner's broadcast (grpo.weight_sync=broadcast); returns the seconds it took."""
        t = time.time()
        self.engine.load(self.channel.receive(meta))
        self.version = version
        self.counters["load_s"] += time.time() - t
        return time.time() - t

    def stats(self) -> dict[str, Any]:
        import ray

        return {
            "backend": self.backend,
            "version": self.version,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            **self.counters,
        }
