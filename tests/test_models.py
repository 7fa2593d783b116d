"""Real students beyond the demo's: a Qwen3-family folder loads, its chat template's thinking switch is
honoured, LoRA finds every target; a hub id offline without a cached copy says what to set."""

from __future__ import annotations

import pytest

from icdray import chat, models

# the part of Qwen3's chat template that reads the thinking switch, on a minimal chat layout
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    """A small random Qwen3-architecture model saved as an HF folder (no download: the config is built)."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("qwen3-tiny")
    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    tok.chat_template = QWEN3_STYLE_TEMPLATE
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_qwen3_folder_loads_with_its_thinking_switch_and_lora_targets(qwen3_folder):
    model, tok = models.load(qwen3_folder)
    assert model.config.model_type == "qwen3"
    think_off = tok.decode(chat.encode_prompt(tok, "Pneumonia treated.", [], 512, thinking=False))
    think_on = tok.decode(chat.encode_prompt(tok, "Pneumonia treated.", [], 512, thinking=True))
    assert think_off.rstrip().endswith("<think>\n\n</think>") and "<think>" not in think_on
    targets = models.lora_targets(model.config)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(targets) <= names and {"q_proj", "down_proj"} <= set(targets)


def test_a_hub_id_offline_without_a_cached_copy_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        models.resolve("Qwen/Qwen3-0.6B")
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "HF_ENDPOINT" in text and "local folder" in text
