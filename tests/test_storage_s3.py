"""Every stage on shared object storage: a real S3-protocol server (moto) on 127.0.0.1, the jobs run as
users run them (subprocesses with their own local Ray), SFT and GRPO are killed mid-run and resume at
step N+1 from the checkpoints they left in s3://; the resumed GRPO steps repeat the killed run's exactly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from icdray import layout, storage

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "icdray-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server and the environment pyarrow (and every Ray worker) reads its endpoint from."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}",
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    ).create_dir(BUCKET)
    try:
        yield {**os.environ, **env, "RAY_ADDRESS": ""}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _job(env: dict, stage: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", stage, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _sets(*items: str) -> list[str]:
    return [x for s in items for x in ("--set", s)]


SFT = (
    "sft.model=tiny",
    "sft.max_steps=4",
    "sft.limit=8",
    "sft.checkpoint_every=2",
    "sft.num_workers=1",
    "sft.cpus_per_worker=1",
    "sft.max_seq_len=1024",
    "inputs.max_prompt_tokens=400",
    "ray.num_cpus=2",
)
GRPO = (
    "grpo.model=tiny",
    "grpo.steps=4",
    "grpo.checkpoint_every=2",
    "grpo.prompts_per_step=2",
    "grpo.max_new_tokens=8",
    "grpo.val_every=0",
    "grpo.extra_draws=0",
    "grpo.lora=false",
    "grpo.lr=1e-2",
    "inputs.max_prompt_tokens=256",
    "ray.num_cpus=2",
    "grpo.reward.length=1.0",
    "grpo.reward.max_chars=1",
    # the drill is about checkpoints on S3, not the rollout engine: generate() starts in a second, vLLM in ~40
    "grpo.engine.backend=hf",
    "grpo.engine.constrained=false",
)


@pytest.mark.slow
def test_stages_checkpoint_to_s3_and_resume_after_a_kill(s3, demo_root):
    root = f"s3://{BUCKET}/run"
    where = layout.Layout(root)
    out = _job(
        s3, "jobs.prepare", "--mimic", demo_root, "--storage", root, *_sets("prepare.max_note_tokens=250")
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(layout.read_split(root, "train")) > 100  # the prepared splits are parquet on S3
    out = _job(s3, "jobs.distill", "--storage", root, *_sets("teacher.limit=12"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert storage.exists(where.exemplars_summary)

    # SFT: rank 0 fails at step 3 with no restart left; the re-run resumes from the step-2 checkpoint on S3
    crashed = _job(
        s3, "jobs.sft", "--storage", root, *_sets(*SFT, "sft.fail_at_step=3", "sft.max_failures=0")
    )
    assert crashed.returncode != 0 and "fault drill" in crashed.stdout + crashed.stderr
    assert not storage.exists(storage.join(where.checkpoint("sft"), "config.json"))
    resumed = _job(
        s3, "jobs.sft", "--storage", root, *_sets(*SFT, "sft.fail_at_step=3", "sft.max_failures=0")
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[sft] resumed from the checkpoint of step 2" in resumed.stdout + resumed.stderr
    # one progress line per step (Ray Train's print patch used to log every line a second time)
    assert (resumed.stdout + resumed.stderr).count("[sft] step 4/4 ") == 1
    steps = [json.loads(x)["step"] for x in storage.read_text(where.metrics("sft")).splitlines()]
    assert steps == [1, 2, 3, 4]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
        storage.listdir(where.checkpoint("sft"))
    )

    # GRPO from the S3 SFT checkpoint: the controller dies after step 4's update (the last checkpoint is
    # step 2's); the re-run continues at 3 and must repeat steps 3 and 4 exactly: the same prompts and seeds,
    # the learner's weights and optimizer state as the checkpoint left them
    drill = [
        sys.executable,
        "-m",
        "icdray.testing.drills",
        "--storage",
        root,
        "--fail-after-update",
        "4",
        *_sets(*GRPO),
    ]
    killed = subprocess.run(drill, cwd=ROOT, env=s3, capture_output=True, text=True, timeout=900)
    assert killed.returncode == 17, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert [n for n in storage.listdir(where.grpo_state) if n.startswith("step-")] == ["step-000002"]
    straight = [json.loads(x) for x in storage.read_text(where.metrics("grpo")).splitlines()]
    assert [m["step"] for m in straight] == [1, 2, 3]
    died = re.search(r"update of step 4 \((.*)\)", killed.stdout)
    assert died and "reward_mean=" in died.group(1), killed.stdout[-2000:]
    step4 = {k: float(v) for k, v in (kv.split("=") for kv in died.group(1).split())}
    out = _job(s3, "jobs.grpo", "--storage", root, *_sets(*GRPO))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from the checkpoint of step 2; continuing at step 3" in out.stdout
    history = [json.loads(x) for x in storage.read_text(where.metrics("grpo")).splitlines()]
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    for resumed, killed_run in ((history[2], straight[2]), (history[3], step4)):
        assert resumed["reward_mean"] == pytest.approx(killed_run["reward_mean"], abs=1e-6)
        assert ("loss" in resumed) == ("loss" in killed_run)
        if "loss" in resumed:
            assert resumed["loss"] == pytest.approx(killed_run["loss"], rel=1e-4, abs=1e-6)
    assert "model.safetensors" in storage.listdir(where.checkpoint("grpo"))
    # a later stage reads the S3 checkpoint like a local one
    from icdray import models

    local = models.resolve(where.checkpoint("grpo"))
    assert Path(local, "config.json").exists() and models.resolve(where.checkpoint("grpo")) == local
