"""Shared fixtures: one local Ray instance per test session, small demo data generated once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


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
