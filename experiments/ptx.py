"""Ablation (c): PPO-ptx on/off → the alignment tax on the pretraining distribution.

    bash scripts/quickstart.sh                    # the default pipeline run the ablation builds on
    python scripts/sweep.py experiments/ptx.py --root runs/sweeps/ptx

InstructGPT (Ouyang et al. 2022, eq. 2) adds γ·E_pretrain[log π(x)] to the PPO objective so that RLHF
does not regress on the pretraining distribution. Each run is the default pipeline's PPO (pretrain, SFT,
comparisons and RM reused from runs/quickstart) with γ = pg.ptx_coef; the evaluation reports each
policy's loss on the pretraining corpus' held-out windows (`pretrain_loss`), so the tax is
policy/pretrain_loss − sft/pretrain_loss, next to the gold score it buys.
"""

from experiments import product

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart"}
SWEEP = product({"pg.pg.ptx_coef": [0.0, 1.0, 3.0]})
COLUMNS = (
    "pretrained/pretrain_loss",
    "sft/pretrain_loss",
    "policy/pretrain_loss",
    "policy/gold_score",
    "policy/win_rate_vs_sft",
    "policy/kl",
)
