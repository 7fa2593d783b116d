"""Fault drills for the GRPO loop, installed through `grpo.Hooks` (the production loop has no fault switches).

    python -m icdray.testing.drills --fail-after-update 3 --storage DIR --set grpo.steps=4 ...

runs `icdray grpo` with the drill installed: `--fail-after-update N` kills the controller process right
after step N's update (exit code 17, before step N's checkpoint), printing that step's mean reward and
loss exactly; `--kill-rollout-at N` kills a
rollout actor while step N's generation is in flight.
"""

from __future__ import annotations

import argparse
import os
import sys

from icdray.grpo import Hooks

DRILL_EXIT = 17


class FailAfterUpdate(Hooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_update(self, step: int, ctl: object, result: dict[str, float]) -> None:
        if step == self.step:
            # exact figures (repr), so a test can check that a resumed run repeats this step bit for bit
            figures = " ".join(f"{k}={result[k]!r}" for k in ("reward_mean", "loss") if k in result)
            print(
                f"[grpo] fault drill: the controller dies after the update of step {step} ({figures})",
                flush=True,
            )
            os._exit(DRILL_EXIT)


class KillRolloutAt(Hooks):
    def __init__(self, step: int) -> None:
        self.step = step

    def generation_in_flight(self, step: int, ctl: object) -> None:
        import ray

        if step == self.step:
            ray.kill(ctl.rollout[0])  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    from icdray import grpo
    from icdray.config import load_config
    from icdray.runtime import ensure_ray

    ap = argparse.ArgumentParser(prog="python -m icdray.testing.drills")
    ap.add_argument("--fail-after-update", type=int, default=0)
    ap.add_argument("--kill-rollout-at", type=int, default=0)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    cfg = load_config(None, [f"storage={args.storage}", *args.overrides])
    hooks: Hooks = Hooks()
    if args.fail_after_update:
        hooks = FailAfterUpdate(args.fail_after_update)
    elif args.kill_rollout_at:
        hooks = KillRolloutAt(args.kill_rollout_at)
    ensure_ray(cfg.ray)
    print(grpo.run(cfg, hooks=hooks).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
