"""What moves PPO's win rate over SFT: a stronger SFT recipe, a noisier demonstrator, and PPO's variance levers.

    bash scripts/quickstart.sh                    # the default pipeline run the sweep builds on
    python scripts/sweep.py experiments/win_rate_levers.py --root runs/sweeps/win_rate_levers
    python scripts/best_of_n.py runs/sweeps/win_rate_levers/<run>   # the RM's best-of-n ceiling of a run

Each run is the whole pipeline at seed 0, its pretrained model taken from runs/quickstart; the runs
that change the SFT recipe train SFT, the comparisons and the RM themselves (about 6 minutes each on
2 CPU cores, the sweep about 50). First, the comparisons sampled at PPO's temperature 0.7 instead of
1.0, and the RM trained 4x longer at lr 3e-4 (pretrain and SFT as in runs/quickstart). Then the levers,
cumulative: a longer, faster SFT (lr 1e-3, sequences of 64 tokens, 1,200 steps), 20,000 demonstrations
instead of 6,000, a demonstrator that slips on half its demonstrations (default 0.2); then, on that SFT and
RM, PPO with a 3x learning rate, a critic initialised from the RM, 4 samples per prompt with a leave-one-out
baseline, 256 episodes per iteration, and the gold judge as the reward (the ceiling).

Measured at commit 37eaaec, on the default preset of the time (no chatter, 1,000 pretrain and 800 SFT
steps at lr 3e-4 on 96-token windows, operands up to 49); experiments/README.md gives those numbers
under "Before the chatty demonstrator". On today's default the SFT overrides below shorten SFT
(1,200 of 2,000 steps) rather than strengthen it.
"""

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart"}
_SFT = {"sft.optim.lr": 1e-3, "sft.data.seq_len": 64, "sft.num_steps": 1200}
_SFT20K = {**_SFT, "data.num_demos": 20000}
_NOISY = {**_SFT20K, "data.demo_error_rate": 0.5}
SWEEP = [
    {"data.sample_temperature": 0.7},  # comparisons sampled as PPO samples (default 1.0)
    {"rm.num_steps": 1600, "rm.optim.lr": 3e-4, "rm.eval_every": 400, "rm.checkpoint.every": 400},  # RM 4x longer
    _SFT,
    _SFT20K,
    _NOISY,
    {**_NOISY, "pg.optim.lr": 1e-4},
    {**_NOISY, "pg.pg.critic": "reward_model"},
    {**_NOISY, "pg.rollout.samples_per_prompt": 4, "pg.pg.score_baseline": "loo"},
    {**_NOISY, "pg.batch_size": 256, "pg.num_steps": 20, "pg.checkpoint.every": 5},
    {**_NOISY, "policy_reward": "gold"},
]
COLUMNS = (
    "sft/gold_score",
    "sft/harmful_rate",
    "rm/accuracy_vs_gold",
    "policy/gold_score",
    "policy/harmful_rate",
    "policy/kl",
    "policy/win_rate_vs_sft",
    "best_of_4_sft_by_rm/win_rate_vs_sft",
)
