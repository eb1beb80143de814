"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"):
PPO without the critic — the reward-to-go of the KL-penalised per-token reward, normalised over the
whole batch instead of estimated by a value function.

    python -m rlhf_jax.main --config=configs/reinforce_pp.py:tiny --workdir=runs/reinforce_pp_tiny
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=reinforce_pp \
        --workdir=runs/reinforce_pp_pipeline --config.reuse_from=runs/quickstart

Presets: default, tiny. As the paper states it: the token-level KL penalty stays in the reward
(r_t = −β·KL_t, plus the score at the end of the response), the advantage is the reward-to-go
Σ_{s≥t} γ^{s−t} r_s with γ = 1, whitened over every token of the global batch (no group, so one
sample per prompt suffices), and PPO's clipped surrogate with its mini-batch updates stays (4 epochs
× 4 minibatches, token mean). β and its controller are configs/ppo.py's (adaptive, β0 = 0.15): the
paper's point is the estimator, and keeping PPO's KL makes the two differ in the critic alone.
"""

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

ALGORITHMS = {
    "reinforce_pp": dict(
        pg=dict(
            advantage="reinforce_pp",
            loss_aggregation="token_mean",
            whiten_advantages=False,
            score_baseline="none",
            critic="shared",
        )
    ),
}

LABELS = {"reinforce_pp": "REINFORCE++"}


def get_config(preset: str = "default"):
    if preset not in ("default", "tiny"):
        raise ConfigError(f"configs/reinforce_pp.py: unknown preset {preset!r}; use default or tiny.")
    return stage_config("ppo", preset, ALGORITHMS["reinforce_pp"])
