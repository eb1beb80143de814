"""The headline on a real model: the InstructGPT recipe from SmolLM2-135M-Instruct (configs/pipeline.py:smollm2)
on the built-in task in ChatML, judged by the gold judge on 200 held-out prompts, 3 seeds.

    bash scripts/setup_real.sh && source .venv/bin/activate
    python -m rlhf_jax.convert gguf --out=models/smollm2
    python scripts/sweep.py experiments/smollm2.py --root runs/sweeps/smollm2 --workers 1

Per seed the PPO run makes the seed's SFT policy (LoRA on SmolLM2), its 300 ranked prompts and its RM; GRPO and
DPO reuse them (config.reuse_from), so the three start from the same SFT policy and labeler budget, and every
evaluation decodes the same prompts with the same keys. Rows: SmolLM2-Instruct prompted zero-shot and 2-shot (the
task's system message "Answer with the result only."), SFT, best-of-4 SFT samples by the RM, PPO, GRPO, DPO.
Tuning budget: none for any algorithm (one LoRA lr, 1e-4, for every stage). analyze() gives mean ± std over
seeds with 95% t-intervals, each row minus SFT paired by seed, and the policies against one another paired by seed
(DPO − PPO, GRPO − PPO, DPO − GRPO): the tiny model's "DPO ≥ PPO?" asked on the real one.
"""

SEEDS = (0, 1, 2)
POLICIES = ("ppo", "grpo", "dpo")
BASE = "configs/pipeline.py:smollm2"
SWEEP = [
    {"policy": p, "seed": s, **({"reuse_from": f"runs/sweeps/smollm2/policy=ppo,seed={s}"} if p != "ppo" else {})}
    for s in SEEDS
    for p in POLICIES
]
COLUMNS = (
    "policy/gold_score",
    "policy/correct_rate",
    "policy/answer_correct_rate",
    "policy/win_rate_vs_sft",
    "policy/kl",
    "policy/wall_s",
    "sft/gold_score",
)
METRICS = (
    ("gold_score", "gold"),
    ("correct_rate", "exact-correct"),
    ("answer_correct_rate", "answer-correct"),
    ("chatter_rate", "chatter"),
    ("win_rate_vs_sft", "win rate vs SFT"),
    ("kl", "KL(π ‖ SFT)"),
    ("wall_s", "policy stage wall time, s"),
)
# summary.json's rows that every run of a seed shares, read from its PPO run
PAIRS = (("DPO", "PPO"), ("GRPO", "PPO"), ("DPO", "GRPO"))  # compared paired by seed
SHARED_ROWS = (
    ("gpt_zero_shot", "SmolLM2-Instruct zero-shot"),
    ("gpt_few_shot", "SmolLM2-Instruct 2-shot"),
    ("sft", "SFT"),
    ("best_of_4_sft_by_rm", "best-of-4 SFT by the RM"),
)


def per_seed(root: str, rows) -> dict[str, dict[int, dict]]:
    """{row label: {seed: that row's summary.json entry}} over the finished runs."""
    import json
    import os

    out = {}
    for r in rows:
        if r["status"] != "finished":
            continue
        with open(os.path.join(root, r["run"], "summary.json")) as f:
            summary = json.load(f)
        out.setdefault(r["policy"].upper(), {})[r["seed"]] = summary["policy"]
        if r["policy"] == "ppo":
            for key, label in SHARED_ROWS:
                out.setdefault(label, {})[r["seed"]] = summary[key]
    return out


def interval(x) -> dict:
    """mean, std and the 95% t-interval of the values x (one per seed)."""
    import numpy as np

    from experiments.algorithms import _t975

    x = np.asarray(x, float)
    mean, std = float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0
    half = _t975(len(x)) * std / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": len(x)}


def analyze(root, rows):
    import json
    import os

    table = per_seed(root, rows)
    order = [label for _, label in SHARED_ROWS[:3]] + ["PPO", "GRPO", "DPO", SHARED_ROWS[3][1]]
    deltas = ("gold_score", "correct_rate", "answer_correct_rate", "chatter_rate")
    stats, paired = {}, {}
    for label in (x for x in order if x in table):
        runs = table[label]
        stats[label] = {
            m: interval([runs[s][m] for s in sorted(runs)])
            for m, _ in METRICS
            if all(isinstance(runs[s].get(m), (int, float)) for s in runs)
        }
        if label != "SFT" and "SFT" in table:
            seeds = sorted(set(runs) & set(table["SFT"]))
            paired[label] = {m: interval([runs[s][m] - table["SFT"][s][m] for s in seeds]) for m in deltas}
    versus = {}
    for a, b in PAIRS:
        if a in table and b in table:
            seeds = sorted(set(table[a]) & set(table[b]))
            versus[f"{a} − {b}"] = {m: interval([table[a][s][m] - table[b][s][m] for s in seeds]) for m in deltas}
    with open(os.path.join(root, "aggregate.json"), "w") as f:
        json.dump({"rows": stats, "minus_sft_paired": paired, "policies_paired": versus}, f, indent=1)
    cell = lambda v: f"{v['mean']:.3f} ± {v['std']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
    lines = [
        "## SmolLM2-135M-Instruct on the built-in task (mean ± std over seeds [95% t-interval])",
        "",
        "| row | seeds | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for label in stats:
        s = stats[label]
        n = s.get("gold_score", {}).get("n", 0)
        lines.append(f"| {label} | {n} | " + " | ".join(cell(s[m]) if m in s else "—" for m, _ in METRICS) + " |")
    for title, diffs in (("each row minus SFT on the same seed", paired), ("one policy minus another", versus)):
        lines += [
            "",
            f"### Paired by seed: {title} (mean [95% t-interval])",
            "",
            "| row | Δ gold | Δ exact-correct | Δ answer-correct | Δ chatter |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {label} | "
            + " | ".join(f"{p[m]['mean']:+.3f} [{p[m]['lo']:+.3f}, {p[m]['hi']:+.3f}]" for m in deltas)
            + " |"
            for label, p in diffs.items()
        ]
    with open(os.path.join(root, "smollm2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)
