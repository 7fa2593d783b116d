"""The command line as a user runs it: real subprocesses for the documented entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icdray.cli import main
from icdray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(ROOT / "configs/default.yaml", ["prepare.max_note_tokens=123", "storage=s3://b/x"])
    assert cfg.prepare.max_note_tokens == 123 and cfg.storage == "s3://b/x"
    assert load_config(None) == load_config(ROOT / "configs/default.yaml")  # the file spells out the defaults
    with pytest.raises(ValueError, match="unknown key"):
        load_config(None, ["prepare.max_tokens=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(None, ["prepare.max_note_tokens=lots"])


def test_demo_data_command(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path), "--admissions", "30", "--seed", "1"]) == 0
    assert (tmp_path / "note/discharge.csv.gz").exists() and (
        tmp_path / "hosp/d_icd_diagnoses.csv.gz"
    ).exists()
    assert "admissions 30" in capsys.readouterr().out


def test_prepare_job_module_reports_missing_input(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare",
            "--mimic",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "s"),
            "--set",
            "ray.num_cpus=1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "MIMIC-IV root" in proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_end_to_end_in_a_subprocess(tmp_path):
    """`icdray demo` as `make demo` runs it: data -> prepare -> distill -> baseline -> SFT -> GRPO -> evaluate -> serve."""
    exe = Path(sys.executable).with_name("icdray")
    proc = subprocess.run(
        [
            str(exe),
            "demo",
            "--storage",
            str(tmp_path),
            "--set",
            "demo.admissions=300",
            "--set",
            "ray.object_store_mb=200",
            # the demo's LLM stages at test scale: the tiny model, 2 steps, 2 short answers per model
            *("--set", "sft.model=tiny", "--set", "demo.sft_steps=2", "--set", "demo.sft_examples=8"),
            *("--set", "demo.eval_notes=2", "--set", "demo.eval_max_new_tokens=16"),
            *("--set", "demo.grpo_steps=2", "--set", "demo.grpo_max_new_tokens=16"),
            *("--port", str(_free_port())),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| tfidf-logreg |" in proc.stdout and "sample_f1" in proc.stdout
    assert (tmp_path / "reports/tfidf-logreg.json").exists()
    assert (tmp_path / "prompts/train").is_dir() and (tmp_path / "prompts/_report.json").exists()
    assert (tmp_path / "exemplars/part-0.parquet").exists() and "kept" in proc.stdout
    assert (tmp_path / "checkpoints/sft/config.json").exists()
    assert "| base-tiny |" in proc.stdout and "| sft-tiny |" in proc.stdout
    assert (tmp_path / "reports/sft-tiny.json").exists()
    assert "[grpo] step 2/2" in proc.stdout and (tmp_path / "checkpoints/grpo/model.safetensors").exists()
    assert "| sft+grpo-tiny |" in proc.stdout and (tmp_path / "reports/sft+grpo-tiny.json").exists()
    results = (tmp_path / "reports/results.md").read_text()
    assert (
        results.index("| tfidf-logreg |")
        < results.index("| base-tiny |")
        < results.index("| sft+grpo-tiny |")
    )
    assert (tmp_path / "reports/sample_f1.png").exists() and (tmp_path / "reports/grpo_curves.png").exists()
    assert "POST http://127.0.0.1:" in proc.stdout and "coder page: http://127.0.0.1:" in proc.stdout
