"""Shared fixtures: one local Ray instance per test session, small demo data generated once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


_BACKGROUND: list = []  # processes started for the session (subprocess.Popen, each its own process group)


def pytest_collection_modifyitems(session, config, items):
    """Start the install dry-runs (test_install.py) as soon as they are selected: two minutes of waiting
    on the package index then overlap the rest of the suite."""
    if config.option.collectonly:
        return
    for item in items:
        if item.name.startswith("test_environment_resolves_from_nothing"):
            started = item.module.start_dry_runs(config._tmp_path_factory.mktemp("dry-runs"))
            _BACKGROUND.extend(started.values())
            break


def pytest_sessionfinish(session, exitstatus):
    """Dry-runs still going when the session ends (a -x stop, a deselected test) are stopped."""
    import signal

    for proc in _BACKGROUND:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance sized for 2-core CI machines; shared by every Ray test."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=300 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """400 demo admissions in MIMIC-IV layout (deterministic, seed 7)."""
    from icdray.demo_data import write_demo

    root = tmp_path_factory.mktemp("mimic-demo")
    write_demo(root, 400, seed=7, progress=False)
    return str(root)
