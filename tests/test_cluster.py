"""Cluster files are checked, not just written: launcher config, KubeRay manifests, runtime env, GPU profile;
and a real multi-node cluster (separate `ray start` processes) runs submitted jobs."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from icdray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"


def _entry_module_exists(entrypoint: str) -> None:
    args = shlex.split(entrypoint)
    assert args[:2] == ["python", "-m"], entrypoint
    module = args[2]
    assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{module} in {entrypoint!r} does not exist"
    if "--config" in args:
        assert (ROOT / args[args.index("--config") + 1]).exists()


def _import_path_resolves(path: str) -> None:
    module, _, attr = path.partition(":")
    assert hasattr(importlib.import_module(module), attr), path


def _check_pod(template: dict, gpu: bool) -> None:
    (container,) = template["spec"]["containers"]
    assert container["image"] and container["name"]
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
    mounts = {m["name"] for m in container.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])}


def _check_ray_cluster_spec(spec: dict) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"])
    _check_pod(spec["headGroupSpec"]["template"], gpu=False)
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        _check_pod(group["template"], gpu=group["rayStartParams"].get("num-gpus") == "1")


def test_launcher_config():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in gpu)
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_an_existing_job():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["kind"] == "RayJob"
    _entry_module_exists(doc["spec"]["entrypoint"])
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_kuberay_rayservice_serves_the_app():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    _check_serve_config(serve_cfg)
    _check_ray_cluster_spec(doc["spec"]["rayClusterConfig"])


def _check_serve_config(cfg: dict) -> None:
    from serve_app.app import DEFAULTS

    (app,) = cfg["applications"]
    _import_path_resolves(app["import_path"])
    (dep,) = app["deployments"]
    assert dep["name"] == "Coder"
    assert set(dep["user_config"]) <= set(DEFAULTS)
    from icdray.config import EngineConfig, from_dict

    from_dict(EngineConfig, dep["user_config"].get("engine", {}), "engine")  # unknown engine keys would raise


def test_serve_config_matches_the_app():
    _check_serve_config(yaml.safe_load((ROOT / "serve_app" / "serve_config.yaml").read_text()))


def test_runtime_env_and_gpu_profile():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    gpu = load_config(ROOT / "configs" / "gpu.yaml")  # unknown keys would raise
    assert gpu.grpo.use_gpu and gpu.grpo.rollout_workers > 1 and gpu.grpo.rollout_gpus == 1
    assert gpu.sft.zero_stage == 3 and gpu.sft.use_gpu
    assert (
        gpu.grpo.engine.device == "cuda"
        and gpu.grpo.engine.dtype == "bfloat16"
        and not gpu.grpo.engine.enforce_eager
    )
    text = (ROOT / "benchmarks" / "gpu_smoke.sh").read_text()
    for stage in re.findall(r"^icdray (\S+)", text, re.M):
        assert (ROOT / "jobs" / f"{stage.replace('-', '_')}.py").exists(), stage


# ------------------------------------------------------------------------- a real multi-node cluster


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """A head (1 CPU) and two worker nodes (1 CPU each) as separate processes; stopped afterwards."""
    d = tmp_path_factory.mktemp("cluster")
    port = 6390 + os.getpid() % 50 * 2
    env = {**os.environ, "RAY": str(Path(sys.executable).with_name("ray")), "RAY_ADDRESS": ""}
    script = str(CLUSTER / "local_cluster.sh")
    out = subprocess.run(
        [script, "start", "--workers", "2", "--port", str(port), "--dir", str(d)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if out.returncode != 0:
        subprocess.run([script, "stop", "--dir", str(d)], env=env, timeout=120)
        pytest.fail(f"local cluster did not start: {out.stderr[-2000:]}")
    try:
        yield {"gcs": f"127.0.0.1:{port}", "api": f"http://127.0.0.1:{port + 1}", "dir": d}
    finally:
        subprocess.run([script, "stop", "--dir", str(d)], env=env, timeout=120)


def _submit(cluster, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("icdray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    return subprocess.run(
        [str(exe), "submit", *args, "--address", cluster["api"]],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.slow
def test_jobs_on_a_multi_node_cluster(local_cluster, tmp_path):
    store = tmp_path / "store"
    mimic = tmp_path / "mimic"
    out = _submit(local_cluster, "demo_data", "--out", str(mimic), "--admissions", "200")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    # prepare on Ray Data with small batches: its tasks spread over the three nodes
    out = _submit(
        local_cluster,
        "prepare",
        "--mimic",
        str(mimic),
        "--storage",
        str(store),
        "--set",
        "prepare.batch_size=16",
        "--set",
        "prepare.num_cpus=0.5",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "SUCCEEDED" in out.stdout and (store / "prompts" / "train").is_dir()
    # a tiny SFT job with two Ray Train workers of 1 CPU each: no node has 2 CPUs, so they run on two nodes
    out = _submit(local_cluster, "distill", "--storage", str(store), "--set", "teacher.limit=8")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    out = _submit(
        local_cluster,
        "sft",
        "--storage",
        str(store),
        *("--set", "sft.model=tiny", "--set", "sft.num_workers=2", "--set", "sft.cpus_per_worker=1"),
        *("--set", "sft.max_steps=2", "--set", "sft.limit=8", "--set", "sft.grad_accum=1"),
        *("--set", "sft.val_fraction=0", "--set", "sft.max_seq_len=2048"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "sft: 2 steps" in out.stdout and (store / "checkpoints" / "sft" / "config.json").exists()
    digests = {p.read_text() for p in (store / "checkpoints" / "_ray").glob("*/_icdray/rank-*.sha256")}
    assert (
        len(list((store / "checkpoints" / "_ray").glob("*/_icdray/rank-*.sha256"))) == 2 and len(digests) == 1
    )
    # a GRPO job with two rollout workers, spread over different nodes
    out = _submit(
        local_cluster,
        "grpo",
        "--storage",
        str(store),
        *("--set", "grpo.model=tiny", "--set", "grpo.steps=2", "--set", "grpo.prompts_per_step=2"),
        *("--set", "grpo.max_new_tokens=8", "--set", "grpo.val_every=0", "--set", "grpo.rollout_workers=2"),
        *(
            "--set",
            "grpo.rollout_cpus=0.5",
            "--set",
            "grpo.learner_cpus=0.5",
            "--set",
            "grpo.reward_cpus=0.25",
        ),
        *("--set", "grpo.engine.threads_bind=auto", "--set", "inputs.max_prompt_tokens=512"),
        *("--set", "grpo.extra_draws=0"),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "[grpo] step 2/2" in out.stdout
    nodes = re.search(r"rollout nodes: (\d+)", out.stdout)
    assert nodes and int(nodes.group(1)) == 2, out.stdout[-2000:]


@pytest.mark.slow
def test_a_failing_job_returns_failed_with_its_log(local_cluster, tmp_path):
    out = _submit(
        local_cluster, "prepare", "--mimic", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "x")
    )
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "not found" in out.stdout  # the job's own error message, streamed
