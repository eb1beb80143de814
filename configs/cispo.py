"""CISPO (MiniMax-M1, Chen et al. 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
Attention", §3.1): REINFORCE with a clipped, stop-gradient importance weight, so that no token's gradient is
dropped by the clip (the low-probability "reflection" tokens PPO's clip removes after the first update).

    python -m rlhf_jax.main --config=configs/cispo.py:tiny --workdir=runs/cispo_tiny    # verifiable reward, CPU
    python -m rlhf_jax.main --config=configs/cispo.py --workdir=runs/cispo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=cispo --workdir=runs/cispo_pipeline \
        --config.reuse_from=runs/quickstart

Presets: default, tiny. As the paper states it:
  - L = −Σ_{i,t} sg(min(ρ_{i,t}, 1 + ε_high))·Â_i·log π_θ / Σ_i |o_i| (eq. 4; rl.cispo): no lower bound
    ("we did not impose a lower bound ... by setting ε_low to a large value"), the batch's token sum over its
    token count (token_mean);
  - GRPO's group-normalised advantage (eq. 2); no KL term in the objective: β = 0;
  - ε_high: the paper tunes it and does not publish it; 0.28 here (DAPO's clip-higher bound).
  The minibatches are configs/gspo.py's 4 per batch (the paper's count is not stated): several updates per
  batch are what the weight is for (with one the ratio is 1). G = 8 as configs/grpo.py.
"""

from rlhf_jax.config import config_module

# GRPO's group-relative advantage and k3 KL in the loss (configs/grpo.py), with this paper's changes
_GRPO = config_module("grpo")
GRPO = _GRPO.ALGORITHMS["grpo"]
ALGORITHMS = {
    "cispo": dict(
        pg={
            **GRPO["pg"],
            "loss_aggregation": "token_mean",
            "num_minibatches": 4,
            "policy_loss": "cispo",
            "clip_range_high": 0.28,
        },
        kl={**GRPO["kl"], "init_coef": 0.0},
        rollout=dict(samples_per_prompt=8),
    ),
}
LABELS = {"cispo": "CISPO"}


def get_config(preset: str = "default"):
    return _GRPO.group_preset("cispo", ALGORITHMS["cispo"], preset)
