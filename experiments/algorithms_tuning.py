"""The head-to-head's tuning budget: every algorithm at the same three learning rates, on seed 0.

    bash scripts/quickstart.sh                      # seed 0's pretrain, SFT, comparisons and RM
    python scripts/sweep.py experiments/algorithms_tuning.py --root runs/sweeps/algorithms_tuning

Each run is the default pipeline with config.policy set (and a VARIANT's stage keys, e.g. GRPO + TIS)
and its stage's lr swept over LRS; everything upstream (pretrain, SFT, the 3,000 ranked comparisons,
the RM) is reused from runs/quickstart, so
every algorithm starts from the same SFT policy and sees the same labels. That is the whole budget:
three runs per algorithm, no other setting tuned — each algorithm keeps its paper's settings
(configs/<algorithm>.py). The lr with the best held-out gold score (seed 0's evaluation prompts) is
the one experiments/algorithms.py runs on five seeds; seed 0 is therefore the tuning seed, and that
file also reports the mean over seeds 1-4 alone.
"""

from rlhf_jax import algorithms

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart"}
LRS = (3e-5, 1e-4, 3e-4)
# every config's ALGORITHMS (rlhf_jax.algorithms): the pg stage's swept by config.pg.optim.lr, the dpo stage's
# by config.dpo.optim.lr
POLICY_GRADIENT, DIRECT = algorithms.of_stage("pg"), algorithms.of_stage("dpo")
# Variants: an algorithm of the registry with stage keys changed, tuned and compared as one of its own.
# GRPO + TIS: the sampler-trainer mismatch corrected by truncated importance weights per token (Yao et al.
# 2025, "Your efficient RL framework secretly brings you off-policy RL training"; configs/ppo.py's cap, 2).
VARIANTS = {"grpo+tis": {"policy": "grpo", "pg.pg.rollout_correction": "tis"}}
NAMES = POLICY_GRADIENT + tuple(VARIANTS) + DIRECT  # every row of the tables, in their order
SWEEP = (
    [{"policy": p, "pg.optim.lr": lr} for p in POLICY_GRADIENT for lr in LRS]
    + [{**keys, "pg.optim.lr": lr} for keys in VARIANTS.values() for lr in LRS]
    + [{"policy": p, "dpo.optim.lr": lr} for p in DIRECT for lr in LRS]
)
COLUMNS = (
    "policy/gold_score",
    "policy/win_rate_vs_sft",
    "policy/kl",
    "policy/chatter_rate",
    "policy/answer_correct_rate",
    "policy/harmful_rate",
)


def lr_of(row) -> float:
    return row.get("pg.optim.lr") or row.get("dpo.optim.lr")


def label(row) -> str:
    """The algorithm a run (or SWEEP entry) is: the VARIANTS name whose keys it sets, else its policy."""
    for name, keys in VARIANTS.items():
        if all(row.get(k) == v for k, v in keys.items()):
            return name
    return row["policy"]


def stage_of(name: str) -> str:
    """The stage an algorithm or variant trains in (pg or dpo)."""
    return algorithms.algorithms()[VARIANTS.get(name, {"policy": name})["policy"]].stage


def chosen(rows) -> dict[str, float]:
    """{algorithm or variant (label): the lr whose run has the best held-out gold score} over the finished runs."""
    best = {}
    for r in rows:
        if r["status"] == "finished" and (label(r) not in best or r["policy/gold_score"] > best[label(r)][1]):
            best[label(r)] = (lr_of(r), r["policy/gold_score"])
    return {p: lr for p, (lr, _) in best.items()}


def analyze(root, rows):
    import json
    import os

    picks = chosen(rows)
    with open(os.path.join(root, "chosen_lr.json"), "w") as f:
        json.dump(picks, f, indent=2)
    lines = [
        "## Learning rate per algorithm (held-out gold score, seed 0)",
        "",
        "| algorithm | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " | chosen |",
        "|---|" + "---|" * (len(LRS) + 1),
    ]
    for p in NAMES:
        cells = []
        for lr in LRS:
            r = next((r for r in rows if label(r) == p and lr_of(r) == lr and r["status"] == "finished"), None)
            cells.append(
                f"{r['policy/gold_score']:.3f} (win {r['policy/win_rate_vs_sft']:.3f}, KL {r['policy/kl']:.2f})"
                if r
                else "—"
            )
        lines.append(f"| {p} | " + " | ".join(cells) + f" | {picks.get(p, float('nan')):g} |")
    return lines
