"""RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
Human Feedback in LLMs"): the policy-gradient stage with a leave-one-out baseline instead of a critic.

    python -m rlhf_jax.main --config=configs/rloo.py:tiny --workdir=runs/rloo_tiny      # verifiable reward, CPU
    python -m rlhf_jax.main --config=configs/rloo.py --workdir=runs/rloo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=rloo --workdir=runs/rloo_pipeline \
        --config.reuse_from=runs/quickstart

Presets: default, tiny. As the paper states it:
  - the whole response is one action: its reward is the RM score minus β·Σ_t (log π − log π_ref), the
    sequence-level k1 KL kept in the reward (as InstructGPT), and its advantage that reward minus the
    mean reward of the prompt's other k − 1 samples; k = 4 (the paper's larger setting; it also runs 2);
  - vanilla REINFORCE: one update per batch, so the clipped ratio stays 1 and the loss is
    −A_i·Σ_t log π(y_t); the token sum over a constant (`token_sum`) is that sum, scaled;
  - β = 0.05, fixed (TRL's RLOOConfig default; the paper tunes β per task).
"""

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

ALGORITHMS = {
    "rloo": dict(
        pg=dict(
            advantage="rloo",
            loss_aggregation="token_sum",
            whiten_advantages=False,
            epochs=1,
            num_minibatches=1,
            score_baseline="none",
            critic="shared",
        ),
        kl=dict(kind="fixed", init_coef=0.05, placement="reward", estimator="k1"),
        rollout=dict(samples_per_prompt=4),
    ),
}

LABELS = {"rloo": "RLOO"}


def get_config(preset: str = "default"):
    if preset not in ("default", "tiny"):
        raise ConfigError(f"configs/rloo.py: unknown preset {preset!r}; use default or tiny.")
    overrides = dict(ALGORITHMS["rloo"])
    if preset == "tiny":  # 4 prompts x 4 samples per iteration
        overrides["batch_size"] = 16
    return stage_config("ppo", preset, overrides)
