"""Where RLHF's gain comes from: the chatty demonstrator's rate, 0 → 0.35 → 0.7 (the default).

    bash scripts/quickstart.sh                    # the default pipeline run the sweep builds on
    python scripts/sweep.py experiments/chatter.py --root runs/sweeps/chatter

The demonstrator slips on 20% of its answers (a dropped, swapped or wrong word: found only by solving
the instruction) and, independently, ends `data.demo_chatter_rate` of them with a remark such as
"42 is the answer" although the task asks for the result only (seen at a glance). SFT imitates both.
Each run retrains SFT, the comparisons, the RM and PPO on its own demonstrations (pretraining is
reused from runs/quickstart: the corpus does not depend on the rate); the rate-0.7 run is the
default and reuses everything. The question: does PPO beat SFT because the preference signal removes
what a rater sees (chatter, forbidden words), or does it also fix slips (answer_correct_rate: exact-correct
with the remark cut off)?
"""

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart"}
SWEEP = [{"data.demo_chatter_rate": r} for r in (0.0, 0.35, 0.7)]
COLUMNS = (
    "policy/win_rate_vs_sft",
    "sft/gold_score",
    "policy/gold_score",
    "sft/chatter_rate",
    "policy/chatter_rate",
    "sft/answer_correct_rate",
    "policy/answer_correct_rate",
    "sft/harmful_rate",
    "policy/harmful_rate",
    "rm/accuracy_vs_gold",
    "policy/kl",
)
