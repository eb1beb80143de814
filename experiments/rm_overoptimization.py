"""Ablation (b): RMs trained on fewer comparisons → over-optimisation, with Gao et al.'s fit.

    bash scripts/quickstart.sh                    # the default pipeline run the ablation builds on
    python scripts/sweep.py experiments/rm_overoptimization.py --root runs/sweeps/rm_overoptimization

Each run trains the RM on the first N of the 3000 ranked prompts (K=4: 6 pairs each) of the default
pipeline's comparisons (pretrain, SFT and the comparisons are reused from runs/quickstart), then runs
PPO against it with a small fixed β so the policy travels far from SFT. Along each PPO run the proxy
(the RM's normalised score) and the gold judge are logged per iteration; gold gain vs d = sqrt(KL)
is fitted with R(d) = d (α − β ln d) (Gao et al. 2022, eq. 2; experiments/_analysis.py). Gains are
measured from the SFT policy at d = 0: gold from its score on the held-out prompts (same temperature
as the rollouts; one 64-episode batch is too noisy to anchor on), proxy from PPO's first iteration,
whose rollouts are the SFT policy's.
"""

from experiments import product

BASE = "configs/pipeline.py"
FIXED = {
    "reuse_from": "runs/quickstart",
    "pg.kl.kind": "fixed",
    "pg.kl.init_coef": 0.02,
    "pg.num_steps": 100,
    "pg.checkpoint.every": 50,
}
SWEEP = product({"rm.data.train_lines": [(0, 300), (0, 1000), (0, 3000)]})
COLUMNS = ("rm/accuracy_vs_gold", "policy/kl", "policy/gold_score", "policy/win_rate_vs_sft")
WINDOW = 10  # PPO iterations averaged per point: one 64-episode batch is noisy


def analyze(root, rows):
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from experiments._analysis import fit_gao, gao_peak, ppo_curve

    done = [r for r in rows if r["status"] == "finished"]
    lines = [
        "## Over-optimisation: gold gain vs d = sqrt(KL) along PPO, fit R(d) = d (α − β ln d)",
        "",
        f"Points: means of {WINDOW} PPO iterations (64 episodes each) on the training prompts. Gold gain = gold "
        "score − the SFT policy's on the held-out prompts (same temperature); proxy gain = RM score − PPO's "
        "first iteration's (the SFT policy's rollouts). The fit passes through d = 0.",
        "",
        "| comparisons (prompts) | RM acc. vs gold | α | β | peak d* | gold gain at the end | proxy gain at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(done):
        run = os.path.join(root, r["run"])
        c = ppo_curve(run, WINDOW)
        with open(os.path.join(run, "summary.json")) as f:
            sft_gold = json.load(f)["sft"]["gold_score"]
        d = np.concatenate([[0.0], c["d"]])
        gain = np.concatenate([[0.0], c["gold"] - sft_gold])
        proxy = np.concatenate([[0.0], c["proxy"] - c["proxy_init"]])
        alpha, beta = fit_gao(d, gain)
        n = r["rm.data.train_lines"]
        n = n[1] - n[0] if isinstance(n, (list, tuple)) else n
        lines.append(
            f"| {n} | {r['rm/accuracy_vs_gold']:.3f} | {alpha:.3f} | {beta:.3f} | {gao_peak(alpha, beta):.2f} "
            f"| {gain[-1]:+.3f} | {proxy[-1]:+.3f} |"
        )
        grid = np.linspace(1e-3, d.max(), 100)
        axes[0].plot(d, gain, "o", color=f"C{i}", ms=3, label=f"{n} prompts")
        axes[0].plot(grid, grid * (alpha - beta * np.log(grid)), "-", color=f"C{i}")
        axes[1].plot(d, proxy, "o-", color=f"C{i}", ms=3, label=f"{n} prompts")
    axes[0].set_title("gold gain (points) and fit (lines)", fontsize=9)
    axes[1].set_title("proxy (RM) gain", fontsize=9)
    for ax in axes:
        ax.set_xlabel("d = sqrt(KL(π ‖ π_SFT)), nats^½")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "overoptimization.png"), dpi=110)
    plt.close(fig)
    return lines + ["", "![over-optimisation](overoptimization.png)"]
