"""Connecting to Ray: the cluster a job was submitted to, or a local instance sized for this machine."""

from __future__ import annotations

import logging
import os

from icdray.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process.

    Under `ray job submit` RAY_ADDRESS is set and we join that cluster. Otherwise a local instance
    starts, without the dashboard unless `cfg.dashboard` (it costs ~1 GB here).
    """
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict = {
        "include_dashboard": cfg.dashboard,
        "configure_logging": True,
        "logging_level": logging.WARNING,
    }
    if cfg.num_cpus:
        kwargs["num_cpus"] = cfg.num_cpus
    if cfg.object_store_mb:
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
    ray.init(**kwargs)
