"""The GRPO stage as one package, in the order a step runs:

    loop.py     the controller: `train_step` = sample -> generate -> score -> advantages -> update -> sync
    rollout.py  RolloutWorker actors (one generation engine each, icdray.engine)
    rewards.py  the reward functions and RewardWorker actors
    algo.py     pure math: group advantages, clipped loss, k3 KL, truncated importance weights
    packing.py  learner layouts: a group's answers behind one shared prompt, or padded rows
    masks.py    the sampler's grammar mask rebuilt along each answer (mask-consistent log-probs)
    learner.py  Learner actors: one DeepSpeed rank each

`icdray grpo` / `python -m jobs.grpo` run `loop.run`.
"""

from icdray.grpo.loop import GRPOResult, Hooks, run

__all__ = ["GRPOResult", "Hooks", "run"]
