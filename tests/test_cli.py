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
    cfg = load_config(ROOT / "configs/demo.yaml", ["prepare.max_note_tokens=123", "storage=s3://b/x"])
    assert cfg.prepare.max_note_tokens == 123 and cfg.storage == "s3://b/x"
    assert load_config(None) == load_config(ROOT / "configs/demo.yaml")  # the file spells out the defaults
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
            "--storage",
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
    assert "Traceback" not in proc.stderr and "-v" in proc.stderr  # what to do, and how to see more


def test_verbose_errors_show_the_stack_trace(tmp_path, capsys):
    assert main(["-v", "prepare", "--mimic", str(tmp_path / "none"), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "MIMIC-IV root" in err


def _plan(*args: str) -> dict:
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "icdray.cli", "pipeline", "--plan", "--json", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {s["name"]: s for s in json.loads(proc.stdout)["stages"]}


def test_plan_shows_the_profiles_own_numbers(tmp_path):
    import yaml

    gpu_file = yaml.safe_load((ROOT / "configs/gpu.yaml").read_text())
    gpu = _plan("--config", "configs/gpu.yaml", "--storage", str(tmp_path / "g"))
    assert list(gpu) == [
        "prepare",
        "distill",
        "baseline",
        "sft",
        "grpo",
        "evaluate",
        "calibrate",
        "report",
    ]  # no demo data
    assert all(s["status"] == "todo" for s in gpu.values())
    sft, g = gpu["sft"]["settings"], gpu["grpo"]["settings"]
    assert sft["model"] == gpu_file["sft"]["model"] and sft["workers"] == gpu_file["sft"]["num_workers"]
    assert sft["gpus"] == gpu_file["sft"]["num_workers"] and sft["examples"] == "all"
    assert (
        g["steps"] == gpu_file["grpo"]["steps"]
        and g["rollout_workers"] == gpu_file["grpo"]["rollout_workers"]
    )
    assert g["learner_workers"] == gpu_file["grpo"]["learner_workers"] and g["group_size"] == 8
    assert gpu["evaluate"]["settings"]["notes"] == "all"  # a real run scores the whole test split
    demo = _plan("--storage", str(tmp_path / "d"))  # the default profile is the demo's
    defaults = load_config(ROOT / "configs/demo.yaml")
    assert (
        "demo-data" in demo
        and demo["demo-data"]["settings"]["admissions"] == defaults.prepare.demo_admissions
    )
    assert demo["sft"]["settings"]["model"] == defaults.sft.model
    assert demo["sft"]["settings"]["steps"] == (defaults.sft.max_steps or f"{defaults.sft.epochs} epoch(s)")
    assert demo["sft"]["settings"]["examples"] == defaults.sft.limit
    assert demo["grpo"]["settings"]["steps"] == defaults.grpo.steps
    assert demo["evaluate"]["settings"]["notes"] == defaults.evaluate.limit
    assert demo["sft"]["settings"]["output"] == str(tmp_path / "d" / "checkpoints" / "sft")


def test_a_profile_without_mimic_data_stops_with_the_key_to_set(tmp_path, capsys):
    assert main(["pipeline", "--config", str(ROOT / "configs/gpu.yaml"), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "prepare.mimic" in err and "MIMIC-IV root" in err
    assert not (tmp_path / "mimic-demo").exists()  # no synthetic notes unless the profile asks for them


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_end_to_end_in_a_subprocess(tmp_path):
    """`icdray demo` as `make demo` runs it, at tiny scale: every stage, the report, then serving."""
    exe = Path(sys.executable).with_name("icdray")
    tiny = [
        "prepare.demo_admissions=300",
        "prepare.top_k_codes=50",
        "ray.object_store_mb=200",
        "baseline.encoder=false",
        "sft.model=tiny",
        "sft.max_steps=2",
        "sft.limit=8",
        "grpo.steps=2",
        "grpo.max_new_tokens=16",
        "answer.max_codes=3",
        "answer.max_reasoning_chars=16",
        "answer.max_evidence_chars=12",
        "evaluate.limit=3",
        "evaluate.max_new_tokens=16",
    ]
    proc = subprocess.run(
        [
            str(exe),
            "demo",
            "--storage",
            str(tmp_path),
            *(x for s in tiny for x in ("--set", s)),
            "--port",
            str(_free_port()),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "prompts/train").is_dir() and (tmp_path / "prompts/_report.json").exists()
    assert (tmp_path / "exemplars/part-0.parquet").exists() and "kept" in proc.stdout
    assert (tmp_path / "checkpoints/sft/config.json").exists()
    assert "[grpo] step 2/2" in proc.stdout and (tmp_path / "checkpoints/grpo/model.safetensors").exists()
    import json

    # the validation gate scored the start model and the last step, and exported the better one
    assert "[grpo] start model: val sample-F1" in proc.stdout
    gate = json.loads((tmp_path / "checkpoints/grpo/gate.json").read_text())
    kept = json.loads((tmp_path / "checkpoints/grpo/icdray_grpo.json").read_text())["kept_step"]
    assert set(gate) == {"0", "2"} and kept == (2 if gate["2"] > gate["0"] else 0)

    data = json.loads((tmp_path / "reports/results.json").read_text())
    rows = {r["model"]: r for r in data["rows"]}
    assert {
        "frequency-prior",
        "tfidf-logreg",
        "base-tiny",
        "base-tiny-free",
        "sft-tiny",
        "sft+grpo-tiny",
    } <= set(rows)
    assert all(r["label_space"] == "top-50" for r in rows.values())
    assert rows["sft+grpo-tiny"]["constrained"] is True and rows["sft+grpo-tiny-free"]["constrained"] is False
    assert (
        rows["sft-tiny"]["invalid_rate"] == 0.0 and rows["sft-tiny"]["format_ok_rate"] == 1.0
    )  # the grammar
    assert {(c["a"], c["b"]) for c in data["comparisons"]} >= {
        ("base-tiny", "sft-tiny"),
        ("sft-tiny", "sft+grpo-tiny"),
        ("sft+grpo-tiny", "sft+grpo-tiny-supported"),  # the decision rule, tuned on validation
    }
    rule = rows["sft+grpo-tiny-supported"]
    assert rule["rule_of"] == "sft+grpo-tiny" and rule["n"] == rows["sft+grpo-tiny"]["n"]
    cal = json.loads((tmp_path / "reports/calibration.json").read_text())
    assert cal["calibration"]["cut"] == cal["rule"]["cut"] == rule["cut"]
    assert cal["model"] == "sft+grpo-tiny" and cal["decoded_with"] == "the test pass"  # no engine of its own
    if kept == 0:  # the SFT weights were exported: their rows are reused, SFT's test pass decoded calibration
        assert rows["sft+grpo-tiny"]["reused_from"] == "sft-tiny" and cal["pass_of"] == "sft-tiny"
        assert "decoded in sft-tiny's (the same weights) test pass" in proc.stdout
        assert rows["sft+grpo-tiny"]["sample_f1"] == rows["sft-tiny"]["sample_f1"]
        reused = (tmp_path / "reports/predictions/sft+grpo-tiny.jsonl").read_text()
        assert reused == (tmp_path / "reports/predictions/sft-tiny.jsonl").read_text()
    else:  # the calibration notes decoded in the final model's test pass
        assert cal["pass_of"] == "sft+grpo-tiny" and "decoded in its test pass" in proc.stdout
    preds = [
        json.loads(x) for x in (tmp_path / "reports/predictions/sft+grpo-tiny.jsonl").read_text().splitlines()
    ]
    assert len(preds) == 3 and all({"hadm_id", "gold", "codes", "flags"} <= set(p) for p in preds)
    val = (tmp_path / "reports/predictions/sft+grpo-tiny@val.jsonl").read_text().splitlines()
    assert len(val) == cal["notes"] > 0 and not {json.loads(v)["hadm_id"] for v in val} & {
        p["hadm_id"] for p in preds
    }
    results = (tmp_path / "reports/results.md").read_text()
    assert (
        results.index("| frequency-prior |")
        < results.index("| base-tiny |")
        < results.index("| sft+grpo-tiny |")
    )
    for png in ("sample_f1.png", "grpo_curves.png", "sft_loss.png"):
        assert (tmp_path / "reports" / png).exists()
    assert "POST http://127.0.0.1:" in proc.stdout and "coder page: http://127.0.0.1:" in proc.stdout
