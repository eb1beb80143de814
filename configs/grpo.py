"""GRPO (DeepSeekMath, Shao et al. 2024) and Dr. GRPO (Liu et al. 2025): the policy-gradient stage with a
group baseline instead of a critic.

    python -m rlhf_jax.main --config=configs/grpo.py:tiny --workdir=runs/grpo_tiny      # verifiable reward, CPU
    python -m rlhf_jax.main --config=configs/grpo.py --workdir=runs/grpo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.main --config=configs/grpo.py:dr_grpo --workdir=runs/dr_grpo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=grpo --workdir=runs/grpo_pipeline \
        --config.reuse_from=runs/quickstart    # the main job's SFT and RM, GRPO as the policy stage

Presets: default, tiny (seconds; a verifiable reward), dr_grpo, dr_grpo_tiny. The same stage as
configs/ppo.py (the pg stage, stages/pg.py); only ALGORITHMS[...] differs, and `config.policy` of the pipeline
applies it on top of the pipeline's own policy-stage sizes.

GRPO, as DeepSeekMath states it (its eq. 3, and the training setting of its RL experiments):
  - advantage: each output's reward minus its group's mean, over the group's std (outcome supervision),
    the same on every token; G outputs per question (theirs: 64; here 8 of a 64-episode batch);
  - KL in the loss, not the reward: β·D_KL(π ‖ π_ref) with the unbiased k3 estimator, β = 0.04;
  - loss: per-output token mean, then the mean over outputs (the 1/|o_i| of eq. 3);
  - one policy update per batch of rollouts ("a single update following each exploration stage");
  - clip ε = 0.2 (the paper leaves ε unstated; 0.2 as PPO and TRL's GRPOConfig).
  Their learning rate (1e-6, for a 7B model) is not carried over: the lr is a size setting.
Dr. GRPO ("Understanding R1-Zero-Like Training") removes the two normalisations that bias GRPO:
no division by the group std, and a token sum over a constant (the response budget) instead of 1/|o_i|.
Its paper trains with β = 0; here β stays GRPO's, so the two presets differ in exactly those two terms.
"""

from rlhf_jax.config import stage_config
from rlhf_jax.errors import ConfigError

_GRPO = dict(
    pg=dict(
        advantage="grpo",
        loss_aggregation="sequence_mean",
        whiten_advantages=False,
        epochs=1,
        num_minibatches=1,
        score_baseline="none",
        critic="shared",
    ),
    kl=dict(kind="fixed", init_coef=0.04, placement="loss", estimator="k3"),
    rollout=dict(samples_per_prompt=8),
)
ALGORITHMS = {
    "grpo": _GRPO,
    "dr_grpo": {**_GRPO, "pg": {**_GRPO["pg"], "advantage": "dr_grpo", "loss_aggregation": "token_sum"}},
}
LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO"}


def get_config(preset: str = "default"):
    tiny = preset == "tiny" or preset.endswith("_tiny")
    name = preset.removesuffix("_tiny") if preset not in ("default", "tiny") else "grpo"
    if name not in ALGORITHMS:
        raise ConfigError(f"configs/grpo.py: unknown preset {preset!r}; use default, tiny, dr_grpo or dr_grpo_tiny.")
    overrides = dict(ALGORITHMS[name])
    if tiny:  # 4 prompts x 4 samples per iteration
        overrides.update(rollout=dict(samples_per_prompt=4), batch_size=16)
    return stage_config("ppo", "tiny" if tiny else "default", overrides)


def group_preset(file: str, algorithm: dict, preset: str, **tiny_pg):
    """configs/<file>.py:<preset> for an algorithm built on GRPO (DAPO, GSPO, CISPO): its ALGORITHMS entry over the
    pg stage's default, or its tiny sizes (4 prompts x 4 samples per iteration, 2 minibatches, and `tiny_pg`)."""
    if preset not in ("default", "tiny"):
        raise ConfigError(f"configs/{file}.py: unknown preset {preset!r}; use default or tiny.")
    overrides = dict(algorithm)
    if preset == "tiny":
        pg = {**overrides["pg"], "num_minibatches": 2, **tiny_pg}
        overrides.update(pg=pg, rollout=dict(samples_per_prompt=4), batch_size=16)
    return stage_config("ppo", preset, overrides)
