"""Typed, frozen configuration per stage, loaded from YAML with `--set key.sub=value` overrides.

Every field has a default, so `icdray <stage>` runs on the embedded default with no file at all;
`configs/default.yaml` spells the same defaults out. Ray workers receive these dataclasses
explicitly (they pickle); nothing reads configuration from globals.

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

T = TypeVar("T")


# every linear layer of a Llama/Qwen block (names that do not exist in a model are skipped)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoConfig:
    admissions: int = 2000  # enough for a meaningful baseline; 100_000 is the prepare benchmark's input
    seed: int = 0
    # `icdray demo` trains and evaluates the LLM at a scale 2 CPU cores finish in minutes (a 135M model
    # learns ~50 tokens/s here; a demo example is ~2.5k tokens). Real runs use the sft/evaluate sections.
    sft_steps: int = 4
    sft_examples: int = 16
    sft_max_seq_len: int = 1536  # SmolLM2 peaks at ~5.5 GB per worker at 1.5k tokens on CPU, ~10 GB at 3k
    eval_notes: int = 4
    eval_max_new_tokens: int = 1024
    grpo_steps: int = 4  # a short GRPO stage after SFT: shows the loop, too short to move F1 much
    grpo_prompts: int = 2
    grpo_group: int = 4
    grpo_max_new_tokens: int = 256


@dataclass(frozen=True)
class PrepareConfig:
    mimic: str = ""  # MIMIC-IV root holding hosp/ and note/; "" = <storage>/mimic-demo (made by demo-data)
    keep_discharge_diagnosis: bool = False  # True only to compare with benchmarks that keep the leaky section
    max_note_tokens: int = (
        3000  # approximate tokens (see notes.count_tokens); long notes lose low-value sections first
    )
    train_frac: float = 0.8
    val_frac: float = 0.1  # test gets the rest
    split_seed: int = 0
    split_file: str = ""  # optional CSV/parquet hadm_id -> split (train|val|test), e.g. a published split
    batch_size: int = (
        2048  # notes per Ray Data batch (a task each; large enough to amortise the per-batch join)
    )
    num_cpus: float = 1.0  # CPUs per map task


@dataclass(frozen=True)
class BaselineConfig:
    max_features: int = 20_000
    ngram_max: int = 1  # bigrams cost 3x the fit time here for no gain on sample-F1 (measured on demo data)
    min_code_count: int = 2  # codes seen fewer times in train get no classifier (they still count as misses)
    C: float = 8.0  # weak regularisation: each label has few positives
    rare_max: int = 10  # codes with <= this many training admissions are "rare" in the report
    n_jobs: int = 2  # parallel per-code fits (joblib processes)
    encoder: bool = True  # also the MiniLM sentence-encoder baseline (the prototype's BERT-style row)
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
    price_input_per_mtok: float = (
        0.30  # USD per 1M input tokens (Gemini 2.5 Flash list price), for the estimate
    )
    price_output_per_mtok: float = 2.50  # USD per 1M output tokens, thinking included
    limit: int = 0  # distill at most this many training notes; 0 = all
    retry_failed: bool = (
        False  # re-attempt calls that failed for good in an earlier run (answers stay cached)
    )


@dataclass(frozen=True)
class SFTConfig:
    model: str = "smollm2-135m"  # registry name (smollm2-135m | tiny), HF folder, or hub id
    lora: bool = True  # LoRA adapters (False = full fine-tune)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload: bool = False  # ZeRO optimizer (and, at stage 3, parameter) offload to CPU memory
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = as many as the epochs give
    lr: float = 2e-4  # LoRA-typical; use ~1e-5 for a full fine-tune
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # linear warm-up, then cosine decay to 0
    micro_batch_size: int = 1  # sequences per worker per forward pass
    grad_accum: int = 4
    max_seq_len: int = 4096  # prompt + answer tokens; longer examples get a shorter note (as prepare cuts it)
    gradient_checkpointing: bool = (
        True  # recompute activations in backward: long clinical notes fit in memory
    )
    limit: int = 0  # train on the first N exemplars (0 = all)
    val_fraction: float = 0.1  # exemplars held out (by patient) for the validation loss
    num_workers: int = 2  # Ray Train workers (one DeepSpeed rank each)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch
    max_failures: int = 2  # Ray Train restarts the group from the last checkpoint this many times
    seed: int = 0
    dtype: str = "float32"  # fp32 on CPUs without AVX-512 bf16; bfloat16 on GPUs
    fail_at_step: int = 0  # fault drill: rank 1 raises once when it reaches this step (0 = never)


@dataclass(frozen=True)
class RewardConfig:
    # weights of the rewards in `reward.py` (0 switches one off); code_f1 is the evaluation metric itself
    format: float = 0.2
    code_f1: float = 1.0
    hierarchy: float = 0.3  # partial credit for near misses: an untrained policy scores 0 on exact match
    invalid: float = 0.2
    evidence: float = 0.2
    length: float = 0.0
    max_chars: int = 6000  # the length reward penalises answers longer than this


@dataclass(frozen=True)
class GRPOConfig:
    model: str = ""  # "" = <storage>/checkpoints/sft; or a registry name, HF folder, hub id
    steps: int = 20
    prompts_per_step: int = 4  # notes per step
    group_size: int = 4  # answers sampled per note (G)
    max_new_tokens: int = 512  # per answer; cut answers are invalid JSON and score low on format
    max_prompt_tokens: int = 2048  # longer notes lose low-value sections first (as prepare cuts them)
    temperature: float = 1.0  # 1.0: the sampler's log-probs are the policy's, comparable with the learner's
    top_p: float = 1.0
    # loss: see grpo.py. "token" normalisation and no KL (beta 0, so no reference model) follow DAPO/Dr.GRPO
    loss_type: str = "token"  # token | sequence | dr_grpo
    scale_advantages: bool = True  # divide by the group's std; False = mean-only (Dr.GRPO)
    clip_low: float = 0.2
    clip_high: float = 0.2  # DAPO's clip-higher uses ~0.28
    beta: float = 0.0  # KL weight to the starting policy (k3 estimator); > 0 keeps a reference model
    ppo_epochs: int = 1  # passes over each step's samples; 1 = on-policy (importance ratio starts at 1)
    skip_zero_variance: bool = True  # groups whose answers all scored the same carry no signal: skip them
    lr: float = 2e-5
    weight_decay: float = 0.0
    micro_batch_size: int = 2  # answers per forward/backward pass
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0: the learner's log-probs must match the sampler's on the same weights
    lora_targets: tuple[str, ...] = LORA_TARGETS
    zero_stage: int = 2
    offload: bool = False
    gradient_checkpointing: bool = True
    dtype: str = "float32"
    reward: RewardConfig = field(default_factory=RewardConfig)
    # workers and their resources: rollout and learner get separate CPU/GPU shares so they never fight
    rollout_backend: str = "vllm"  # vllm (default) | hf (transformers generate)
    rollout_workers: int = 1
    rollout_cpus: float = 0.75  # + learner 1.0 + reward 0.25 = the 2 cores of a laptop-sized machine
    rollout_gpus: float = 0.0
    vllm_kv_cache_gb: int = 1  # CPU KV cache per rollout worker
    vllm_threads_bind: str = "all"  # CPU cores for the engine's threads: all | auto | e.g. "0-3"
    max_model_len: int = 4096
    reward_workers: int = 1
    reward_cpus: float = 0.25
    learner_workers: int = 1  # DeepSpeed data-parallel ranks
    learner_cpus: float = 1.0
    learner_threads: int = 0  # torch threads per learner; 0 = its CPU share. Phases alternate, so on a small
    # machine the learner may use every core while the rollout engine waits
    use_gpu: bool = False
    checkpoint_every: int = 10  # steps; the last step always saves the final model
    val_every: int = 10  # steps between validation runs (greedy answers on val, sample-F1); 0 = never
    val_notes: int = 8
    val_max_new_tokens: int = 512
    limit: int = 0  # train on the first N training notes (0 = all)
    seed: int = 0
    fail_at_step: int = 0  # fault drill: the controller dies right after this step's update (0 = never)
    kill_rollout_at_step: int = 0  # fault drill: a rollout actor is killed mid-generation at this step


@dataclass(frozen=True)
class EvaluateConfig:
    limit: int = 0  # score the first N admissions of the split (0 = all)
    max_new_tokens: int = 1024
    batch_size: int = 8  # prompts per generate() call
    workers: int = 1  # Ray Data actors holding a model each
    cpus_per_worker: float = 2.0
    split: str = "test"


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
    demo: DemoConfig = field(default_factory=DemoConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
    """Defaults <- YAML file (if given) <- `--set` overrides."""
    data: dict[str, Any] = to_dict(Config())
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
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
