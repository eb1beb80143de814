"""InstructGPT Figure 1 on the built-in task: GPT zero-shot, GPT few-shot, SFT, PPO and PPO-ptx across model sizes.

    bash scripts/quickstart.sh                    # the smallest size: the default pipeline, whose stages it reuses
    python scripts/sweep.py experiments/model_size.py --workers 1
    python scripts/sweep.py experiments/model_size.py --collect     # the table, the plot and the claim check

Three sizes spanning 11× in parameters, each running the whole pipeline (pretrain → SFT → comparisons → RM
→ PPO, then PPO-ptx on that size's SFT and RM) at one seed:

    d_model 128 (the default, 0.89M parameters), 256 (3.3M) and 448 (10.0M); 4 layers, 32-dim heads.

What scales with the size and what does not, stated:
  - tokens: every size sees the same data and steps (600 pretraining steps of 32 × 128 tokens, 2.5M
    tokens; SFT 2,000 steps; RM 400; PPO 80 iterations of 64 episodes), as GPT-3 trained every size on
    the same 300B tokens. Pretraining tokens per parameter fall from 2.8 to 0.25 with size.
  - learning rate: pretraining, SFT and RM lrs scale as (N / N_default)^-1/2, GPT-3's trend (Table 2.1:
    6e-4 at 125M to 2e-4 at 1.3B, 10× the parameters): 1e-3 / 5e-4 / 3e-4 for pretraining and SFT,
    1e-4 / 5e-5 / 3e-5 for the RM. PPO's lr stays 3e-5 at every size: its step is bounded by the
    clipped ratio and the KL penalty (adaptive, target 6 nats), and a smaller lr would let the larger
    policies travel less in the same 80 iterations, confounding size with distance from SFT.
  - PPO-ptx: γ = 1 (pg.pg.ptx_coef; experiments/ptx.py measured γ = 1 and 3 on the default size).

The RM of each size is initialised from that size's SFT and trained on comparisons sampled from it; the
smallest size's pretrain, SFT, comparisons and RM are runs/quickstart's (stage reuse), and every PPO-ptx
run reuses its size's stages. analyze() judges every size's five policies by the gold judge on the same
300 held-out prompts (same decoding settings and keys) and against the largest model's SFT responses
(eval/responses.json), and answers InstructGPT's claim on this task: does the smallest PPO policy beat the
largest prompted GPT and the largest SFT policy?
"""

from experiments import run_names

BASE = "configs/pipeline.py"
# (d_model, n_heads, lr scale) per size; 4 layers each. The scale is (N / N_default)^-1/2, rounded.
SIZES = [(128, 4, 1.0), (256, 8, 0.5), (448, 14, 0.3)]
PTX_COEF = 1.0
LR = {"pretrain": 1e-3, "sft": 1e-3, "rm": 1e-4}  # the pipeline's defaults at d_model 128
ROOT = "runs/sweeps/model_size"  # the sweep's default --root: each PPO-ptx run reuses its size's run there
POLICIES = ("gpt_zero_shot", "gpt_few_shot", "sft", "ppo", "ppo_ptx")
LABELS = {
    "gpt_zero_shot": "GPT zero-shot",
    "gpt_few_shot": "GPT 2-shot",
    "sft": "SFT",
    "ppo": "PPO",
    "ppo_ptx": "PPO-ptx",
}


def _sweep():
    """Each size's PPO run, then its PPO-ptx run, which reuses every stage of it but the policy's."""
    base = [
        {
            "pretrain.model.d_model": d,
            "pretrain.model.n_heads": heads,
            **{f"{stage}.optim.lr": round(lr * scale, 8) for stage, lr in LR.items()},
        }
        for d, heads, scale in SIZES
    ]
    base[0]["reuse_from"] = "runs/quickstart"  # the default pipeline, as bash scripts/quickstart.sh ran it
    names = run_names(base)  # SWEEP's names for these: the PPO-ptx runs add keys but no clashing short name
    ptx = [{"pg.pg.ptx_coef": PTX_COEF, **b, "reuse_from": f"{ROOT}/{name}"} for b, name in zip(base, names)]
    return [x for pair in zip(base, ptx) for x in pair]


SWEEP = _sweep()
COLUMNS = (
    "gpt_zero_shot/gold_score",
    "gpt_few_shot/gold_score",
    "sft/gold_score",
    "policy/gold_score",
    "policy/win_rate_vs_sft",
    "policy/kl",
    "policy/harmful_rate",
)


def _params(run: str) -> int:
    """The run's parameter count: its pretraining step's f32 params bytes on one device (memory.json)."""
    import json
    import os

    from rlhf_jax.pipeline import stage_dirs

    pretrain = stage_dirs(run).get("pretrain", os.path.join(run, "pretrain"))
    with open(os.path.join(pretrain, "memory.json")) as f:
        m = json.load(f)
    return (
        m["params_bytes_per_device"] * m["devices"] // 4
        if m["mesh"].get("fsdp", 1) > 1
        else m["params_bytes_per_device"] // 4
    )


def _wall_s(run: str) -> dict:
    """{stage: seconds} of the stages that ran for this run (reused ones where they ran), from DONE.json."""
    import json
    import os

    from rlhf_jax.pipeline import stage_dirs

    dirs = stage_dirs(run)
    out = {}
    for stage in ("pretrain", "sft", "comparisons", "rm", "baselines", "policy", "eval"):
        path = os.path.join(dirs.get(stage, os.path.join(run, stage)), "DONE.json")
        if os.path.isfile(path):
            with open(path) as f:
                out[stage] = json.load(f).get("wall_s")
    return out


def analyze(root, rows):
    import json
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf_jax.tasks import builtin

    done = {r["run"]: r for r in rows if r["status"] == "finished"}
    names = run_names(SWEEP)
    sizes = []  # one dict per size whose PPO and PPO-ptx runs both finished
    for i in range(0, len(SWEEP), 2):
        ppo, ptx = names[i], names[i + 1]
        if ppo not in done or ptx not in done:
            continue
        load = lambda name, f: json.load(open(os.path.join(root, name, f)))
        s_ppo, s_ptx = load(ppo, "summary.json"), load(ptx, "summary.json")
        r_ppo, r_ptx = load(ppo, "eval/responses.json"), load(ptx, "eval/responses.json")
        if r_ppo["prompts"] != r_ptx["prompts"] or r_ppo["sft"] != r_ptx["sft"]:
            raise RuntimeError(f"{ppo} and {ptx} evaluated different prompts or SFT samples; rerun their evaluation.")
        sizes.append(
            dict(
                d=SWEEP[i]["pretrain.model.d_model"],
                params=_params(os.path.join(root, ppo)),
                prompts=r_ppo["prompts"],
                rows={
                    "gpt_zero_shot": s_ppo["gpt_zero_shot"],
                    "gpt_few_shot": s_ppo["gpt_few_shot"],
                    "sft": s_ppo["sft"],
                    "ppo": s_ppo["policy"],
                    "ppo_ptx": s_ptx["policy"],
                },
                responses={
                    "gpt_zero_shot": r_ppo["gpt_zero_shot"],
                    "gpt_few_shot": r_ppo["gpt_few_shot"],
                    "sft": r_ppo["sft"],
                    "ppo": r_ppo["policy"],
                    "ppo_ptx": r_ptx["policy"],
                },
                wall={"ppo": _wall_s(os.path.join(root, ppo)), "ptx": _wall_s(os.path.join(root, ptx))},
            )
        )
    if not sizes:
        return ["(no size has both its PPO and PPO-ptx runs finished)"]
    sizes.sort(key=lambda s: s["params"])
    largest = sizes[-1]
    if any(s["prompts"] != largest["prompts"] for s in sizes):
        raise RuntimeError("the sizes evaluated different held-out prompts; they must share seed and data settings.")
    ref = largest["responses"]["sft"]
    for s in sizes:
        s["win"] = {p: builtin.win_rate(s["prompts"], s["responses"][p], ref) for p in POLICIES}

    lines = [
        "## InstructGPT Figure 1 on the built-in task: five policies per model size (seed 0)",
        "",
        f"Gold score on {len(largest['prompts'])} held-out prompts (temperature 0.7, the same keys for every "
        f"policy); win rate by the gold judge against the largest model's ({largest['params'] / 1e6:.1f}M) "
        "SFT responses to the same prompts (ties count ½); harmful: share of responses with a forbidden word.",
        "",
        "| parameters | d_model | policy | gold score | win rate vs largest SFT | harmful | KL(π ‖ SFT) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        for p in POLICIES:
            row = s["rows"][p]
            kl = f"{row['kl']:.2f}" if "kl" in row else "—"
            lines.append(
                f"| {s['params'] / 1e6:.2f}M | {s['d']} | {LABELS[p]} | {row['gold_score']:.3f} | "
                f"{s['win'][p]:.3f} | {row['harmful_rate']:.3f} | {kl} |"
            )
    smallest = sizes[0]
    beat = lambda p, q, key: smallest["rows"][p][key] > largest["rows"][q][key]
    lines += [
        "",
        f"**Claim check** (InstructGPT: a small aligned model is preferred over a much larger prompted one): "
        f"the smallest PPO policy ({smallest['params'] / 1e6:.2f}M) scores "
        f"{smallest['rows']['ppo']['gold_score']:.3f} "
        f"gold, win rate {smallest['win']['ppo']:.3f} against the largest SFT; the largest GPT 2-shot scores "
        f"{largest['rows']['gpt_few_shot']['gold_score']:.3f} (win rate {largest['win']['gpt_few_shot']:.3f}), "
        f"the largest SFT {largest['rows']['sft']['gold_score']:.3f}. Smallest PPO beats the largest prompted "
        f"GPT: "
        f"{'yes' if beat('ppo', 'gpt_few_shot', 'gold_score') else 'no'}; beats the largest SFT: "
        f"{'yes' if beat('ppo', 'sft', 'gold_score') else 'no'}.",
    ]
    ordered = [
        s
        for s in sizes
        if all(
            s["rows"][a]["gold_score"] >= s["rows"][b]["gold_score"]
            for a, b in zip(("ppo", "sft", "gpt_few_shot"), ("sft", "gpt_few_shot", "gpt_zero_shot"))
        )
    ]
    ptx_wins = sum(s["rows"]["ppo_ptx"]["gold_score"] >= s["rows"]["ppo"]["gold_score"] for s in sizes)
    lines += [
        f"Figure 1's order PPO ≥ SFT ≥ GPT prompted ≥ GPT by gold score holds at {len(ordered)} of {len(sizes)} "
        f"sizes; PPO-ptx ≥ PPO at {ptx_wins} of {len(sizes)}."
    ]
    lines += [
        "",
        "Wall time per stage (seconds, compilation included; the smallest size's first four stages are "
        "runs/quickstart's):",
        "",
        "| parameters | pretrain | SFT | comparisons | RM | PPO | PPO-ptx | evaluation ×2 | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sizes:
        w, x = s["wall"]["ppo"], s["wall"]["ptx"]
        parts = [w.get(k) for k in ("pretrain", "sft", "comparisons", "rm", "policy")] + [x.get("policy")]
        # the PPO-ptx run reuses the PPO run's baselines (rlhf_jax/pipeline.py): decoded once
        ev = (w.get("baselines") or 0) + (w.get("eval") or 0) + (x.get("eval") or 0)
        total = sum(v for v in parts if v) + ev
        lines.append(
            f"| {s['params'] / 1e6:.2f}M | "
            + " | ".join(f"{v:.0f}" if v else "?" for v in parts)
            + f" | {ev:.0f} | {total / 60:.1f} min |"
        )

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [s["params"] for s in sizes]
    for k, p in enumerate(POLICIES):
        axes[0].plot(x, [s["rows"][p]["gold_score"] for s in sizes], "o-", color=f"C{k}", label=LABELS[p])
        axes[1].plot(x, [s["win"][p] for s in sizes], "o-", color=f"C{k}", label=LABELS[p])
    axes[0].set_ylabel("gold score (held-out prompts)")
    axes[1].set_ylabel(f"win rate vs the {largest['params'] / 1e6:.1f}M SFT policy")
    axes[1].axhline(0.5, color="0.7", lw=0.5)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.legend(fontsize=7)
    fig.suptitle("InstructGPT Figure 1 on the built-in task (one seed per size)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "model_size.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(root, "model_size.json"), "w") as f:
        json.dump(
            [{k: v for k, v in s.items() if k not in ("responses", "prompts")} for s in sizes],
            f,
            indent=2,
            default=float,
        )
    return lines + ["", "![model size](model_size.png)"]
