"""The head-to-head: PPO, GRPO, Dr. GRPO, RLOO, DPO, IPO, SimPO, Plackett-Luce DPO and online DPO on the
default pipeline, from one SFT policy and one set of comparisons per seed, judged by the gold judge.

    python scripts/check_pipeline.py                  # seeds 0-4 of the default pipeline (PPO): the bases
    python scripts/sweep.py experiments/algorithms_tuning.py --root runs/sweeps/algorithms_tuning   # lr, seed 0
    python scripts/sweep.py experiments/algorithms.py --root runs/sweeps/algorithms

Per seed, every algorithm reuses that seed's pretrain, SFT, the 3,000 ranked comparisons and the RM
(config.reuse_from: seed 0's tuning run at the chosen lr, seeds 1-4 experiments/seeds.py's runs), so
all of them start from the same SFT policy with the same labeler budget: the policy-gradient family
optimises the RM trained on those rankings, the DPO family trains on the rankings themselves, online
DPO ranks its own samples by that RM. Each algorithm keeps its paper's settings (configs/<algorithm>.py)
at the learning rate experiments/algorithms_tuning.py chose for it on seed 0 (three lrs each, the whole
tuning budget). Best-of-4 SFT samples by the RM comes with every pipeline's evaluation. The
verifiable-reward column: PPO and GRPO trained against the gold judge itself (config.policy_reward=gold),
the ceiling a perfect reward gives. analyze() reports mean ± std over the 5 seeds, a 95% t-interval, the
mean over seeds 1-4 (untouched by the tuning), and a plot of gold score against KL. The algorithms are every
config's ALGORITHMS (rlhf_jax.algorithms) and the tuning's VARIANTS (an algorithm with stage keys changed, e.g.
GRPO + TIS); one runs here once CHOSEN_LR has its lr.
"""

from experiments import algorithms_tuning as tuning, run_names

SEEDS = (0, 1, 2, 3, 4)
# experiments/algorithms_tuning.py's choice (runs/sweeps/algorithms_tuning/chosen_lr.json): the lr of the
# best held-out gold score on seed 0 among 3e-5, 1e-4, 3e-4.
CHOSEN_LR = {
    "ppo": 3e-5,
    "grpo": 3e-5,
    "dr_grpo": 1e-4,
    "rloo": 1e-4,
    "dpo": 3e-5,
    "ipo": 3e-5,
    "simpo": 3e-5,
    "plackett_luce": 1e-4,
    "online_dpo": 3e-5,
    # the policy-gradient toolkit's, tuned at 06f91a7 (experiments/results/pg_toolkit_tuning_seed0.json)
    "gspo": 3e-5,
    "cispo": 3e-5,
    "dapo": 3e-5,
    "grpo+tis": 3e-5,
}
NAMES = tuning.NAMES  # every config's ALGORITHMS and the tuning's VARIANTS (GRPO + TIS)
GOLD_REWARD = ("ppo", "grpo")  # trained against the gold judge itself
TUNING_ROOT, SEEDS_ROOT = "runs/sweeps/algorithms_tuning", "runs/sweeps/seeds"


def _lr_key(name: str) -> str:
    return f"{tuning.stage_of(name)}.optim.lr"


_TUNING_RUNS = dict(zip(((tuning.label(r), tuning.lr_of(r)) for r in tuning.SWEEP), run_names(tuning.SWEEP)))


def _base(name: str, seed: int) -> str:
    """Where a run's stages come from: seed 0's tuning run of this algorithm (whose policy stage it
    reuses too), or the seed's default pipeline run."""
    if seed == 0:
        if (name, CHOSEN_LR[name]) not in _TUNING_RUNS:
            raise ValueError(f"CHOSEN_LR[{name!r}] = {CHOSEN_LR[name]:g} is not one of the tuning's LRS {tuning.LRS}.")
        return f"{TUNING_ROOT}/{_TUNING_RUNS[name, CHOSEN_LR[name]]}"
    return f"{SEEDS_ROOT}/seed={seed}"


def _keys(name: str) -> dict:
    """The overrides that select an algorithm or a variant: {"policy": ...} and a variant's stage keys."""
    keys = dict(tuning.VARIANTS.get(name, {"policy": name}))
    return {"policy": keys.pop("policy"), **keys}


BASE = "configs/pipeline.py"
SWEEP = [
    {**_keys(p), "seed": s, _lr_key(p): CHOSEN_LR[p], "reuse_from": _base(p, s)}
    for s in SEEDS
    for p in NAMES
    if p in CHOSEN_LR
]
SWEEP += [
    {
        "policy": p,
        "seed": s,
        _lr_key(p): CHOSEN_LR[p],
        "policy_reward": "gold",
        "reuse_from": f"{SEEDS_ROOT}/seed={s}" if s else "runs/quickstart",
    }
    for s in SEEDS
    for p in GOLD_REWARD
    if p in CHOSEN_LR
]
COLUMNS = (
    "policy/gold_score",
    "policy/correct_rate",
    "policy/answer_correct_rate",
    "policy/chatter_rate",
    "policy/harmful_rate",
    "policy/win_rate_vs_sft",
    "policy/kl",
    "policy/wall_s",
    "sft/gold_score",
    "best_of_4_sft_by_rm/gold_score",
    "best_of_4_sft_by_rm/win_rate_vs_sft",
    "best_of_4_sft_by_rm/chatter_rate",
    "best_of_4_sft_by_rm/harmful_rate",
    "best_of_4_sft_by_rm/correct_rate",
    "best_of_4_sft_by_rm/answer_correct_rate",
)
METRICS = (
    ("gold_score", "gold"),
    ("correct_rate", "exact-correct"),
    ("answer_correct_rate", "answer-correct"),
    ("chatter_rate", "chatter"),
    ("harmful_rate", "harmful"),
    ("win_rate_vs_sft", "win rate vs SFT"),
    ("kl", "KL(π ‖ SFT)"),
    ("wall_s", "policy stage wall time, s"),
)


def _label(row) -> str:
    """A finished run's row in the tables: its algorithm or variant, and whether it trained on the gold judge."""
    return tuning.label(row) + (" (gold reward)" if row.get("policy_reward") == "gold" else "")


def _t975(n: int) -> float:
    """The 97.5% quantile of Student's t with n − 1 degrees of freedom (a two-sided 95% interval)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def _groups(rows, root: str = "") -> dict[str, list[dict]]:
    """{row label: [{metric: value, "seed": s}, ...]}: every finished run's values, with best-of-4 by the RM and
    SFT from the PPO runs' evaluations; a run's policy-stage wall time is read under root when its row lacks it."""
    import os

    from experiments._analysis import policy_stage_seconds

    groups = {}
    for r in rows:
        if r["status"] != "finished":
            continue
        values = {m: r[f"policy/{m}"] for m, _ in METRICS}
        if not isinstance(values.get("wall_s"), (int, float)) and root:
            values["wall_s"] = policy_stage_seconds(os.path.join(root, r["run"]))
        groups.setdefault(_label(r), []).append(values | {"seed": r["seed"]})
        if r["policy"] == "ppo" and r.get("policy_reward") != "gold":
            groups.setdefault("best_of_4_by_rm", []).append(
                {m: r.get(f"best_of_4_sft_by_rm/{m}", float("nan")) for m, _ in METRICS} | {"seed": r["seed"]}
            )
            groups.setdefault("sft", []).append({"gold_score": r["sft/gold_score"], "seed": r["seed"]})
    return groups


def _value(run: dict, metric: str) -> float:
    v = run.get(metric)
    return float(v) if isinstance(v, (int, float)) else float("nan")


def aggregate(rows, root: str = "") -> dict[str, dict[str, dict[str, float]]]:
    """{row label: {metric: {"mean", "std", "lo", "hi", "n", "mean_1_4"}}} over seeds, for every algorithm,
    the gold-reward runs and best-of-4 by the RM (from the PPO runs' evaluations)."""
    import numpy as np

    out = {}
    for label, runs in _groups(rows, root).items():
        out[label] = {}
        for m, _ in METRICS:
            x = np.asarray([_value(run, m) for run in runs], float)
            later = np.asarray([v for v, run in zip(x, runs) if run["seed"] != 0], float)
            ok = x[np.isfinite(x)]
            if not len(ok):
                continue
            mean, std = float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0
            lo, hi = _interval(len(ok), mean, std)
            out[label][m] = {
                "mean": mean,
                "std": std,
                "lo": lo,
                "hi": hi,
                "n": len(ok),
                "mean_1_4": float(np.nanmean(later)) if len(later) else float("nan"),
            }
    return out


PAIRED_METRICS = ("gold_score", "win_rate_vs_sft", "answer_correct_rate", "chatter_rate", "kl")


def _differences(rows, reference: str, metrics) -> dict[str, dict[str, list[float]]]:
    """{label: {metric: [label − reference on each seed both finished]}} for every label but the reference."""
    by = {}
    for r in rows:
        if r["status"] == "finished":
            by.setdefault(_label(r), {})[r["seed"]] = r
    ref = by.get(reference, {})
    return {
        label: {m: [runs[s][f"policy/{m}"] - ref[s][f"policy/{m}"] for s in sorted(runs) if s in ref] for m in metrics}
        for label, runs in by.items()
        if label != reference
    }


def paired_vs(rows, reference: str = "ppo", metrics=PAIRED_METRICS) -> dict:
    """{label: {metric: {"mean", "lo", "hi", "n"}}}: the per-seed difference (label − reference) with a 95%
    t-interval. Every algorithm of a seed starts from that seed's SFT policy and comparisons, so the
    difference cancels what the seed changes for all of them (the SFT policy's own quality, mostly),
    which the unpaired intervals carry."""
    import numpy as np

    out = {}
    for label, diffs in _differences(rows, reference, metrics).items():
        out[label] = {}
        for m, d in diffs.items():
            if len(d) > 1:
                mean = float(np.mean(d))
                lo, hi = _interval(len(d), mean, float(np.std(d, ddof=1)))
                out[label][m] = {"mean": mean, "lo": lo, "hi": hi, "n": len(d)}
    return out


def _joined(count: int, mean: float, std: float, more) -> tuple[int, float, float]:
    """(n, mean, sample std) of a group known only by its count, mean and sample std, joined with more values:
    exactly what the values of both together give (the sums of squares add up about the joint mean)."""
    import numpy as np

    more = np.asarray([x for x in more if np.isfinite(x)], float)
    n = count + len(more)
    joint = (count * mean + more.sum()) / n
    squares = (count - 1) * std**2 + count * (mean - joint) ** 2 + ((more - joint) ** 2).sum()
    return n, float(joint), float(np.sqrt(squares / (n - 1))) if n > 1 else 0.0


def _interval(n: int, mean: float, std: float) -> tuple[float, float]:
    """The 95% t-interval of a mean over n values of sample std `std` (NaN for one value)."""
    half = _t975(n) * std / n**0.5 if n > 1 else float("nan")
    return mean - half, mean + half


def pooled(earlier: dict, earlier_paired: dict, rows, reference: str = "ppo", root: str = "") -> tuple[dict, dict]:
    """(aggregate, paired_vs) over the seeds of an earlier analysis whose runs are gone, kept as its
    aggregate.json and paired_vs_<reference>.json, and the finished runs `rows` of further seeds: the same
    numbers aggregate() and paired_vs() give on all the runs together. A group's mean and sample std follow
    from its count, mean and std; a paired difference's std from its 95% interval and count. The earlier
    seeds must include seed 0 (its mean_1_4 leaves seed 0 out) and the new ones must not. root: the new runs'
    sweep root, where a run's policy-stage wall time is read when its row lacks it (as aggregate() does)."""
    if any(r["seed"] == 0 for r in rows):
        raise ValueError("pooled: seed 0 belongs to the earlier analysis; give only later seeds' runs.")
    groups, new = _groups(rows, root), aggregate(rows, root)
    out = {}
    for label in sorted(set(earlier) | set(new)):
        out[label] = {}
        for m in sorted(set(earlier.get(label, {})) | set(new.get(label, {}))):
            e = earlier.get(label, {}).get(m)
            if e is None:
                out[label][m] = new[label][m]
                continue
            values = [_value(run, m) for run in groups.get(label, [])]
            n, mean, std = _joined(e["n"], e["mean"], e["std"], values)
            lo, hi = _interval(n, mean, std)
            finite = [v for v in values if v == v]
            earlier_1_4 = (e["n"] - 1) * e["mean_1_4"] if e["n"] > 1 else 0.0  # seeds 1.. of the earlier ones
            mean_1_4 = (earlier_1_4 + sum(finite)) / (e["n"] - 1 + len(finite))
            out[label][m] = {"mean": mean, "std": std, "lo": lo, "hi": hi, "n": n, "mean_1_4": float(mean_1_4)}
    metrics = tuple(next(iter(earlier_paired.values())))
    diffs, new_paired = _differences(rows, reference, metrics), paired_vs(rows, reference, metrics)
    paired = {}
    for label in sorted(set(earlier_paired) | set(new_paired)):
        if label not in earlier_paired:
            paired[label] = new_paired[label]
            continue
        paired[label] = {}
        for m, e in earlier_paired[label].items():
            std = (e["hi"] - e["lo"]) / 2 * e["n"] ** 0.5 / _t975(e["n"])
            n, mean, std = _joined(e["n"], e["mean"], std, diffs.get(label, {}).get(m, []))
            lo, hi = _interval(n, mean, std)
            paired[label][m] = {"mean": mean, "lo": lo, "hi": hi, "n": n}
    return out, paired


def separated(a: dict, b: dict) -> bool:
    """Whether two 95% intervals do not overlap: the only case the analysis calls a difference."""
    return a["hi"] < b["lo"] or b["hi"] < a["lo"]


def analyze(root, rows):
    return report(aggregate(rows, root), paired_vs(rows), root)


def report(stats: dict, paired: dict, out: str) -> list[str]:
    """The analysis's markdown lines from aggregate() and paired_vs() numbers (or pooled()'s); writes them as
    aggregate.json and paired_vs_ppo.json, and the gold-vs-KL plot, gold_vs_kl.png, under `out`."""
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out, "aggregate.json"), "w") as f:
        json.dump(stats, f, indent=1)
    order = (
        [p for p in NAMES if p in stats]
        + ["best_of_4_by_rm"]
        + [f"{p} (gold reward)" for p in GOLD_REWARD if f"{p} (gold reward)" in stats]
    )
    lines = [
        "## Head-to-head on the gold judge (mean ± std over seeds; [95% t-interval]; seeds 1-4 mean)",
        "",
        "| algorithm | lr | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for label in order:
        s = stats.get(label, {})
        lr = CHOSEN_LR.get(label.split(" ")[0], "")
        cells = []
        for m, _ in METRICS:
            if m not in s:
                cells.append("—")
                continue
            v = s[m]
            cells.append(
                f"{v['mean']:.3f} ± {v['std']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]; {v['mean_1_4']:.3f}"
                if m != "wall_s"
                else f"{v['mean']:.0f} ± {v['std']:.0f}"
            )
        lines.append(
            f"| {label} (n={s.get('gold_score', {}).get('n', 0)}) | {lr:g} | "
            if lr
            else f"| {label} (n={s.get('gold_score', {}).get('n', 0)}) | — | "
        )
        lines[-1] += " | ".join(cells) + " |"
    if "sft" in stats:
        g = stats["sft"]["gold_score"]
        lines += ["", f"SFT gold score: {g['mean']:.3f} ± {g['std']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]."]
    # Pairs whose gold-score intervals separate: the differences this experiment can call.
    labels = [x for x in order if "gold_score" in stats.get(x, {})]
    calls = [
        f"{a} > {b}" if stats[a]["gold_score"]["mean"] > stats[b]["gold_score"]["mean"] else f"{b} > {a}"
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        if separated(stats[a]["gold_score"], stats[b]["gold_score"])
    ]
    lines += ["", "Gold-score differences whose 95% intervals separate: " + ("; ".join(calls) or "none") + "."]
    wins = [x for x in order if "win_rate_vs_sft" in stats.get(x, {})]
    calls = [
        f"{a} > {b}" if stats[a]["win_rate_vs_sft"]["mean"] > stats[b]["win_rate_vs_sft"]["mean"] else f"{b} > {a}"
        for i, a in enumerate(wins)
        for b in wins[i + 1 :]
        if separated(stats[a]["win_rate_vs_sft"], stats[b]["win_rate_vs_sft"])
    ]
    lines += ["", "Win-rate differences whose 95% intervals separate: " + ("; ".join(calls) or "none") + "."]
    with open(os.path.join(out, "paired_vs_ppo.json"), "w") as f:
        json.dump(paired, f, indent=1)
    lines += [
        "",
        "### Paired by seed: each algorithm minus PPO on the same seed (mean [95% t-interval])",
        "",
        "| algorithm | Δ gold | Δ win rate vs SFT | Δ answer-correct | Δ chatter | Δ KL |",
        "|---|---|---|---|---|---|",
    ]
    fmt = lambda v: (
        (f"{v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" + (" *" if v["lo"] > 0 or v["hi"] < 0 else ""))
        if v
        else "—"
    )
    lines += [
        f"| {x} (n={paired[x].get('gold_score', {}).get('n', 0)}) | "
        + " | ".join(
            fmt(paired[x].get(m))
            for m in ("gold_score", "win_rate_vs_sft", "answer_correct_rate", "chatter_rate", "kl")
        )
        + " |"
        for x in order
        if x in paired
    ]
    lines += ["", "\\* the interval excludes 0: a difference from PPO this experiment can call."]

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, label in enumerate(x for x in order if "kl" in stats.get(x, {})):
        g, k = stats[label]["gold_score"], stats[label]["kl"]
        ax.errorbar(
            k["mean"],
            g["mean"],
            xerr=k["std"],
            yerr=g["std"],
            fmt="os^vD<>ph*P"[i % 11],
            color=plt.cm.tab20(i % 20),
            label=label,
            capsize=2,
            ms=6,
        )
    if "sft" in stats:
        ax.axhline(stats["sft"]["gold_score"]["mean"], color="gray", ls="--", lw=1, label="SFT")
    if "gold_score" in stats.get("best_of_4_by_rm", {}):
        ax.axhline(
            stats["best_of_4_by_rm"]["gold_score"]["mean"],
            color="gray",
            ls=":",
            lw=1,
            label="best of 4 SFT samples by RM",
        )
    ax.set_xlabel("KL(π ‖ SFT), nats per response (held-out prompts)")
    ax.set_ylabel("gold score (held-out prompts)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gold_vs_kl.png"), dpi=120)
    plt.close(fig)
    return lines + ["", "![gold vs KL](gold_vs_kl.png)"]
