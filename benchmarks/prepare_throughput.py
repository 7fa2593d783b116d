"""Prepare throughput: Ray Data on this machine vs the same transformation in one process (pandas).

    python benchmarks/prepare_throughput.py --admissions 100000

Generates (or reuses) demo data, runs `prepare.run_pandas` and `prepare.run` on it in one process,
checks both wrote the same rows, and prints admissions/s for both and their ratio.
Targets (issue 2): Ray >= 1.5x pandas; the whole 100k Ray run under 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from icdray import layout, prepare
from icdray.config import PrepareConfig, RayConfig
from icdray.demo_data import write_demo
from icdray.runtime import ensure_ray


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--admissions", type=int, default=100_000)
    ap.add_argument("--data", default="", help="existing MIMIC-IV-shaped root (default: generate demo data)")
    ap.add_argument("--workdir", default="", help="where demo data and outputs go (default: a temp dir)")
    ap.add_argument("--batch-size", type=int, default=PrepareConfig().batch_size)
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="icdray-bench-")
    data = args.data or os.path.join(work, f"demo-{args.admissions}")
    if not os.path.exists(os.path.join(data, "note", "discharge.csv.gz")):
        t = time.time()
        write_demo(data, args.admissions, seed=0)
        print(f"generated {args.admissions} demo admissions in {time.time() - t:.0f}s")
    cfg = PrepareConfig(batch_size=args.batch_size)

    pandas_report = prepare.run_pandas(cfg, os.path.join(work, "out-pandas"), data)
    print(pandas_report.format())
    t = time.time()
    ensure_ray(RayConfig())
    ray_start = time.time() - t
    cold = prepare.run(cfg, os.path.join(work, "out-ray"), data)
    print(cold.format())
    warm = prepare.run(cfg, os.path.join(work, "out-ray-warm"), data)  # same session: worker processes exist
    same = all(
        layout.read_split(os.path.join(work, "out-pandas"), s).equals(
            layout.read_split(os.path.join(work, "out-ray"), s)
        )
        for s in layout.SPLITS
    )

    n = pandas_report.notes_in
    rate = {name: n / r.seconds for name, r in (("pandas", pandas_report), ("cold", cold), ("warm", warm))}
    print(f"\nprepare throughput, {n} admissions, {os.cpu_count()} cores ({platform.machine()})")
    print("| engine | seconds | admissions/s | vs pandas |")
    print("|---|---:|---:|---:|")
    print(f"| pandas (1 process) | {pandas_report.seconds:.1f} | {rate['pandas']:,.0f} | 1.00x |")
    print(
        f"| Ray Data, first run after ray.init (cold workers) | {cold.seconds:.1f} | {rate['cold']:,.0f} | "
        f"{rate['cold'] / rate['pandas']:.2f}x |"
    )
    print(
        f"| Ray Data, second run in the session (warm workers) | {warm.seconds:.1f} | {rate['warm']:,.0f} | "
        f"{rate['warm'] / rate['pandas']:.2f}x |"
    )
    print(
        f"\ntargets: Ray >= 1.5x pandas; 100k under 300 s (Ray start-up {ray_start:.0f}s not included). "
        f"Identical output: {same}"
    )


if __name__ == "__main__":
    main()
