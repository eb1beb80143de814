"""Ablation (a): the KL coefficient β of PPO on the main job → the KL–gold frontier.

    bash scripts/quickstart.sh                    # the default pipeline run the ablation builds on
    python scripts/sweep.py experiments/kl_frontier.py --root runs/sweeps/kl_frontier

InstructGPT (Ouyang et al. 2022, eq. 2) maximises E[r_θ(x, y)] − β·KL(π ‖ π_SFT). Each run is the
default pipeline with a fixed β; pretrain, SFT, the comparisons and the RM are reused from
runs/quickstart (config.reuse_from: same config, so the same stages), so a run is PPO + evaluation.
The frontier: the held-out gold score and win rate against the KL each β ends at.
"""

from experiments import product

BASE = "configs/pipeline.py"
FIXED = {"reuse_from": "runs/quickstart", "pg.kl.kind": "fixed"}
SWEEP = product({"pg.kl.init_coef": [0.0, 0.03, 0.1, 0.3, 1.0]})
COLUMNS = ("policy/kl", "policy/gold_score", "policy/win_rate_vs_sft", "policy/harmful_rate", "sft/gold_score")


def analyze(root, rows):
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["status"] == "finished"), key=lambda r: r["policy/kl"])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot([r["policy/kl"] for r in done], [r["policy/gold_score"] for r in done], "o-", label="PPO")
    for r in done:
        ax.annotate(f"β={r['pg.kl.init_coef']:g}", (r["policy/kl"], r["policy/gold_score"]), fontsize=7)
    if done:
        ax.axhline(done[0]["sft/gold_score"], color="gray", ls="--", label="SFT")
    ax.set_xlabel("KL(PPO ‖ SFT), nats per response (held-out prompts)")
    ax.set_ylabel("gold score (held-out)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "frontier.png"), dpi=110)
    plt.close(fig)
    return ["## KL–gold frontier", "", "![frontier](frontier.png)"]
