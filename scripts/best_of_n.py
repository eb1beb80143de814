"""Best-of-n curves of a finished pipeline run: how far the RM can lift the SFT policy, and how far the gold judge
could.

    python scripts/best_of_n.py runs/quickstart [--n 16]

Draws n SFT samples per held-out evaluation prompt (the evaluation's decoding settings; sample 0 is
the one the report's SFT row uses), then for n = 1, 2, 4, ... keeps the sample the RM scores highest
("by RM") or the one the gold judge scores highest ("oracle"), and reports its mean gold score and win
rate over sample 0 (ties half). PPO against an RM cannot be expected to beat that RM's best-of-n by
much; a by-RM curve that peaks at small n while the oracle's keeps rising is the RM being
over-optimised (Gao et al. 2022). It also prints, across the samples of each prompt (averaged over
prompts), how the RM score correlates with the gold score and with the response's length in words:
a length correlation that outweighs the gold one is an RM judging form, not content.
Writes <workdir>/eval/best_of_n.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir", help="a finished pipeline run's --workdir")
    ap.add_argument("--n", type=int, default=16, help="samples per prompt (the largest n of the curve)")
    args = ap.parse_args(argv)
    import ml_collections
    import numpy as np

    from rlhf_jax import parallel
    from rlhf_jax.data import prompts as prompt_data
    from rlhf_jax.pipeline import stage_dirs
    from rlhf_jax.pipeline_eval import best_of_n_curve, sft_samples_scored_by_rm, within_prompt_correlation
    from rlhf_jax.tasks import builtin
    from rlhf_jax.tasks.judge import normalise
    from rlhf_jax.trained import load_policy

    wd = os.path.abspath(args.workdir)
    path = os.path.join(wd, "pipeline_config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(wd, "summary.json")):
        raise SystemExit(
            f"{wd} is not a finished pipeline run (no pipeline_config.json / summary.json); run "
            f"bash scripts/quickstart.sh first, or point at another run's --workdir."
        )
    if args.n < 1:
        raise SystemExit(f"--n {args.n}: need at least 1 sample per prompt.")
    with open(path) as f:
        c = ml_collections.ConfigDict(json.load(f))
    sub = {k: os.path.join(wd, k) for k in ("sft", "rm", "eval")} | stage_dirs(wd)
    mesh = parallel.make_mesh({a: c.mesh[a] for a in parallel.MESH_AXES})
    model, params, tok = load_policy(sub["sft"], mesh, parallel.DEFAULT_RULES)
    source, _ = prompt_data.build_prompt_dataset(
        os.path.join(wd, "data", "eval_prompts.jsonl"),
        "prompt",
        tok.path,
        c.data.max_prompt_len,
        os.path.join(sub["eval"], "tfds"),
    )
    with open(os.path.join(wd, "data", "eval_prompts.jsonl")) as f:
        instructions = [json.loads(line)["messages"][-1]["content"] for line in f if line.strip()]
    cands, rm_scores = sft_samples_scored_by_rm(
        c, sub, model, params, tok, source, args.n, mesh, parallel.DEFAULT_RULES
    )
    gold = np.asarray([[builtin.gold_score(p, r) for p, r in zip(instructions, rs, strict=True)] for rs in cands])
    length = np.asarray([[len(normalise(r)) for r in rs] for rs in cands])
    corr = {
        "rm_vs_gold": within_prompt_correlation(rm_scores, gold),
        "rm_vs_length": within_prompt_correlation(rm_scores, length),
    }
    ns = sorted({2**i for i in range(args.n.bit_length()) if 2**i <= args.n} | {args.n})  # 1, 2, 4, ..., n
    curve = best_of_n_curve(rm_scores, gold, ns)
    print(f"best-of-n on {gold.shape[1]} held-out prompts ({wd}); win rates over SFT sample 0, ties half")
    print("| n | gold, by RM | win, by RM | gold, oracle | win, oracle |\n|---|---|---|---|---|")
    for r in curve:
        print(
            f"| {r['n']} | {r['gold_by_rm']:.3f} | {r['win_by_rm']:.3f} | {r['gold_oracle']:.3f} | "
            f"{r['win_oracle']:.3f} |"
        )
    print(
        f"RM score vs gold score, correlation within a prompt's samples: {corr['rm_vs_gold']:.3f}; "
        f"vs response length (words): {corr['rm_vs_length']:.3f}"
    )
    with open(os.path.join(sub["eval"], "best_of_n.json"), "w") as f:
        json.dump({"curve": curve, "within_prompt_correlation": corr, "samples_per_prompt": args.n}, f, indent=2)
    return {"curve": curve, "within_prompt_correlation": corr}


if __name__ == "__main__":
    main()
