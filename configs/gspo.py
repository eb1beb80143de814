"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): GRPO with one importance ratio per
sequence instead of one per token.

    python -m rlhf_jax.main --config=configs/gspo.py:tiny --workdir=runs/gspo_tiny      # verifiable reward, CPU
    python -m rlhf_jax.main --config=configs/gspo.py --workdir=runs/gspo \
        --config.init_from=runs/sft --config.reward.rm_workdir=runs/rm
    python -m rlhf_jax.pipeline --config=configs/pipeline.py --config.policy=gspo --workdir=runs/gspo_pipeline \
        --config.reuse_from=runs/quickstart

Presets: default, tiny. As the paper states it:
  - the ratio s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|), clipped per sequence (eq. 5-7; rl.gspo), with its
    small clip range: ε_left = 3e-4, ε_right = 4e-4 (§5.1; pg.clip_range, pg.clip_range_high);
  - GRPO's group-normalised advantage, the same on every token of a response; the mean over the group's
    sequences (eq. 5's 1/G: sequence_mean);
  - each rollout batch split into 4 minibatches for gradient updates (§5.1), so the ratio moves off 1 and
    the clip acts.
  The paper leaves the KL term out of its objectives; β and the rest stay configs/grpo.py's, so the two
  presets differ in the ratio, the clip range and the minibatches.
"""

from rlhf_jax.config import config_module

# GRPO's group-relative advantage and k3 KL in the loss (configs/grpo.py), with this paper's changes
_GRPO = config_module("grpo")
GRPO = _GRPO.ALGORITHMS["grpo"]
ALGORITHMS = {
    "gspo": dict(
        pg={
            **GRPO["pg"],
            "num_minibatches": 4,
            "policy_loss": "gspo",
            "clip_range": 3e-4,
            "clip_range_high": 4e-4,
        },
        kl=GRPO["kl"],
        rollout=dict(samples_per_prompt=8),
    ),
}
LABELS = {"gspo": "GSPO"}


def get_config(preset: str = "default"):
    return _GRPO.group_preset("gspo", ALGORITHMS["gspo"], preset)
