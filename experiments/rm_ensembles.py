"""RM ensembles against over-optimisation (Coste et al. 2023; Eisenstein et al. 2023), judged by the gold judge.

    bash scripts/quickstart.sh                    # seed 0's default pipeline, whose SFT and comparisons these reuse
    python scripts/check_pipeline.py              # seeds 1-4 (runs/sweeps/seeds), for the 1,000-prompt column
    python scripts/sweep.py experiments/rm_ensembles.py --root runs/sweeps/rm_ensembles --workers 2

Ablation (b)'s setting (experiments/rm_overoptimization.py: RMs on the first 300 / 1,000 / 3,000 of the
3,000 ranked prompts, PPO 100 iterations at a small fixed β = 0.02 so the policy travels far), for one RM
against an ensemble of 4 (rm.ensemble_size = 4: members of seeds s..s+3, each its own reward-head init and
data order, trained in one vmapped step) optimised by its members' mean, a lower confidence bound
mean − λ·std (λ = 0.5, 2) or its worst member (min). The ensemble RM is trained once per column and
reused by its four aggregates (stage reuse). Along PPO the gold judge and the proxy — the members' mean
normalised score, objective/rm_mean, the same quantity for every aggregate — are logged per iteration.
analyze() fits Gao et al.'s R(d) = d (α − β ln d) to gold gain vs d = √KL per run and reports α, β,
the fitted peak d*, the fitted gold gain at the peak, and the final gold and win rate vs SFT from the
held-out evaluation; one plot panel per data size.
"""

from experiments import run_names

BASE = "configs/pipeline.py"
FIXED = {"pg.kl.kind": "fixed", "pg.kl.init_coef": 0.02, "pg.num_steps": 100, "pg.checkpoint.every": 50}
LCB = (0.5, 2.0)
VARIANTS = [{"rm.rm.ensemble_size": 1, "pg.reward.aggregate": "mean"}] + [
    {"rm.rm.ensemble_size": 4, "pg.reward.aggregate": a, "pg.reward.lcb_coef": lam}
    for a, lam in [("mean", 1.0)] + [("lcb", x) for x in LCB] + [("min", 1.0)]
]
BASES = {0: "runs/quickstart", 1: "runs/sweeps/seeds/seed=1", 2: "runs/sweeps/seeds/seed=2"}
# In the order they run: the 1,000-prompt column on seed 0, the other data sizes, then seeds 1 and 2 of 1,000.
COLUMNS_RUN = [(1000, 0), (300, 0), (3000, 0), (1000, 1), (1000, 2)]
ROOT = "runs/sweeps/rm_ensembles"  # the sweep's default --root: the ensemble runs reuse one another's RM there


def _sweep():
    """Every run reuses its seed's pretrain, SFT and comparisons; the lcb and min runs of a column also reuse
    the ensemble RM its ensemble-mean run trained (listed, so run, before them)."""
    first = [
        {"seed": seed, "reuse_from": BASES[seed], "rm.data.train_lines": (0, n), **v}
        for n, seed in COLUMNS_RUN
        for v in VARIANTS
    ]
    names = run_names(first)  # the keys are the same below, so the mean runs keep these names
    out = []
    for r in first:
        if r["rm.rm.ensemble_size"] > 1 and r["pg.reward.aggregate"] != "mean":
            mean_run = next(
                j
                for j, q in enumerate(first)
                if q["seed"] == r["seed"]
                and q["pg.reward.aggregate"] == "mean"
                and q["rm.rm.ensemble_size"] > 1
                and q["rm.data.train_lines"] == r["rm.data.train_lines"]
            )
            r = {**r, "reuse_from": f"{ROOT}/{names[mean_run]}"}
        out.append(r)
    return out


SWEEP = _sweep()
COLUMNS = ("rm/accuracy_vs_gold", "policy/kl", "policy/gold_score", "policy/win_rate_vs_sft")
WINDOW = 10  # PPO iterations averaged per point: one 64-episode batch is noisy


def _label(r) -> str:
    if r["rm.rm.ensemble_size"] == 1:
        return "one RM"
    agg = r["pg.reward.aggregate"]
    return f"ensemble {agg} λ={r['pg.reward.lcb_coef']:g}" if agg == "lcb" else f"ensemble {agg}"


def analyze(root, rows):
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from experiments._analysis import fit_gao, gao_peak, ppo_curve

    done = [r for r in rows if r["status"] == "finished"]
    table, by_label = [], {}
    sizes = sorted({r["rm.data.train_lines"][1] for r in done})
    fig, axes = plt.subplots(2, max(len(sizes), 1), figsize=(4.2 * max(len(sizes), 1), 7), squeeze=False)
    for r in done:
        run = os.path.join(root, r["run"])
        c = ppo_curve(run, WINDOW, proxy_key="objective/rm_mean")
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        sft_gold = summary["sft"]["gold_score"]
        d = np.concatenate([[0.0], c["d"]])
        gain = np.concatenate([[0.0], c["gold"] - sft_gold])
        proxy = np.concatenate([[0.0], c["proxy"] - c["proxy_init"]])
        alpha, beta = fit_gao(d, gain)
        peak = gao_peak(alpha, beta)
        if not (0 < peak <= d.max()):  # a fit still rising at the last point has no peak in what was observed
            peak = float("nan")
        at_peak = peak * (alpha - beta * np.log(peak)) if np.isfinite(peak) else float("nan")
        n, label = r["rm.data.train_lines"][1], _label(r)
        row = dict(
            n=n,
            seed=r["seed"],
            label=label,
            acc=r["rm/accuracy_vs_gold"],
            alpha=alpha,
            beta=beta,
            peak=peak,
            at_peak=at_peak,
            gold=r["policy/gold_score"],
            win=r["policy/win_rate_vs_sft"],
            kl=r["policy/kl"],
            proxy=proxy[-1],
            gain=gain[-1],
        )
        table.append(row)
        by_label.setdefault((n, label), []).append(row)
        if r["seed"] == 0:
            i, k = sizes.index(n), [_label(v) for v in VARIANTS].index(label)
            grid = np.linspace(1e-3, d.max(), 100)
            axes[0, i].plot(d, gain, "o", color=f"C{k}", ms=3, label=label)
            axes[0, i].plot(grid, grid * (alpha - beta * np.log(grid)), "-", color=f"C{k}")
            axes[1, i].plot(d, proxy, "o-", color=f"C{k}", ms=3, label=label)
    for i, n in enumerate(sizes):
        axes[0, i].set_title(f"gold gain, RM on {n} prompts (seed 0)", fontsize=9)
        axes[1, i].set_title(f"proxy gain (members' mean), {n} prompts", fontsize=9)
        for ax in axes[:, i]:
            ax.set_xlabel("d = sqrt(KL(π ‖ π_SFT)), nats^½")
            ax.axhline(0, color="0.7", lw=0.5)
        axes[0, i].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "rm_ensembles.png"), dpi=110)
    plt.close(fig)

    lines = [
        "## RM ensembles vs one RM: gold gain vs d = sqrt(KL) along PPO, fit R(d) = d (α − β ln d)",
        "",
        f"Points: means of {WINDOW} PPO iterations. Gold gain = gold score − the SFT policy's (held-out prompts, "
        "same temperature); proxy = the RM members' mean normalised score, gain from PPO's first iteration. "
        "Final gold / win rate: the held-out evaluation after 100 iterations. Peak d*: the fit's maximum, "
        "n/a where it lies beyond the last observed d (the fit still rising).",
        "",
        "| prompts | seed | reward | RM acc. vs gold | α | β | peak d* | fitted gold gain at d* | final KL | "
        "final gold | win rate vs SFT | proxy gain at the end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(table, key=lambda t: (t["n"], t["seed"], [_label(v) for v in VARIANTS].index(t["label"]))):
        lines.append(
            f"| {t['n']} | {t['seed']} | {t['label']} | {t['acc']:.3f} | {t['alpha']:.3f} | {t['beta']:.3f} | "
            f"{t['peak']:.2f} | {t['at_peak']:+.3f} | {t['kl']:.2f} | {t['gold']:.3f} | {t['win']:.3f} | "
            f"{t['proxy']:+.3f} |"
        )
    multi = {k: v for k, v in by_label.items() if len(v) > 1}
    by_prompts_then_variant = lambda kv: (kv[0][0], [_label(x) for x in VARIANTS].index(kv[0][1]))
    if multi:
        lines += [
            "",
            "Over seeds (mean ± std):",
            "",
            "| prompts | reward | seeds | final gold | win rate vs SFT | peak d* | final KL |",
            "|---|---|---|---|---|---|---|",
        ]
        for (n, label), v in sorted(multi.items(), key=by_prompts_then_variant):
            f = lambda key, v=v: f"{np.mean([x[key] for x in v]):.3f} ± {np.std([x[key] for x in v], ddof=1):.3f}"
            peaks = [x["peak"] for x in v if np.isfinite(x["peak"])]
            peak = f"{np.mean(peaks):.2f} ± {np.std(peaks, ddof=1):.2f}" if len(peaks) > 1 else "n/a"
            peak += f" ({len(peaks)} in range)" if len(peaks) < len(v) else ""
            lines.append(f"| {n} | {label} | {len(v)} | {f('gold')} | {f('win')} | {peak} | {f('kl')} |")
        lines += [
            "",
            "Paired by seed: final gold minus one RM's on the same seed.",
            "",
            "| prompts | reward | per seed | mean |",
            "|---|---|---|---|",
        ]
        single = {(t["n"], t["seed"]): t["gold"] for t in table if t["label"] == "one RM"}
        for (n, label), v in sorted(multi.items(), key=by_prompts_then_variant):
            diffs = [
                x["gold"] - single[n, x["seed"]]
                for x in sorted(v, key=lambda x: x["seed"])
                if label != "one RM" and (n, x["seed"]) in single
            ]
            if diffs:
                lines.append(f"| {n} | {label} | {', '.join(f'{d:+.3f}' for d in diffs)} | {np.mean(diffs):+.3f} |")
    with open(os.path.join(root, "rm_ensembles.json"), "w") as f:
        json.dump(table, f, indent=2, default=float)
    return lines + ["", "![RM ensembles](rm_ensembles.png)"]
