"""Ablation: PPO against the learned RM vs against the gold judge itself (a perfect RM), 80 and 200 iterations.

    bash scripts/quickstart.sh                    # the default pipeline run the ablation builds on
    python scripts/sweep.py experiments/gold_ceiling.py --root runs/sweeps/gold_ceiling

Separates the two reasons PPO can fail to beat SFT on the gold judge: a reward model that disagrees with
gold (over-optimisation of a proxy), and a PPO budget too small to move the policy even with the true
reward. Pretrain, SFT, the comparisons and the RM are reused from runs/quickstart; the rm/80 run is the
quickstart's own PPO (only its evaluation runs again).
"""

from experiments import product

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart"}
SWEEP = product({"policy_reward": ["rm", "gold"], "pg.num_steps": [80, 200]})
COLUMNS = (
    "policy/gold_score",
    "policy/win_rate_vs_sft",
    "policy/harmful_rate",
    "policy/kl",
    "sft/gold_score",
    "sft/harmful_rate",
)
