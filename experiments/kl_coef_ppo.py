"""Ablation: the KL penalty β of PPO (fixed β), with a known reward function instead of an RM.

    python scripts/sweep.py experiments/kl_coef_ppo.py --root runs/sweeps/kl_coef_ppo --workers 2

InstructGPT (Ouyang et al. 2022, eq. 2) maximises E[r(x, y)] − β·KL(π ‖ π_SFT); β trades reward for
staying close to the reference policy. Five runs of configs/ppo.py:tiny for 40 iterations (reward =
rlhf_jax.rewards:fraction_of_vowels, a few minutes each on CPU), β fixed at 0 … 1. Expected shape:
objective/kl falls as β grows, and so does objective/scores; β = 0 is unpenalised reward maximisation.
objective/rlhf_reward is the penalised objective each run optimises. Measured (mean of iterations
31-40): β 0 → 1 takes KL from 0.83 to 0.26 nats and the score from 0.345 to 0.287.
"""

from experiments import product

BASE = "configs/ppo.py:tiny"
FIXED = {
    "kl.kind": "fixed",
    "reward.kind": "function",
    "reward.function": "rlhf_jax.rewards:fraction_of_vowels",
    "num_steps": 40,
    "checkpoint.every": 20,
    "sample_every": 20,
}
SWEEP = product({"kl.init_coef": [0.0, 0.03, 0.1, 0.3, 1.0]})
COLUMNS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "kl_coef")
AVERAGE_LAST = 10  # 8 episodes per iteration: one iteration's KL or score is mostly noise
