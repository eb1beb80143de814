"""HH-RLHF with a real trunk: an RM from SmolLM2-135M-Instruct (configs/smollm2.py:hh_rm, LoRA r8) trained on the
first 1,500 pairs of the shared HH sample and scored on lines 1,500-1,800, against the shorter-wins and
longer-wins baselines on the same held-out pairs (scripts/rm_baselines.py, in characters and in words), with
binomial standard errors.

    bash scripts/setup_real.sh && source .venv/bin/activate
    python -m rlhf_jax.convert gguf --out=models/smollm2
    python -m rlhf_jax.main --config=configs/smollm2.py:hh_rm --workdir=runs/smol_hh_rm \\
        --config.data.train_path=../shared/data/hh_rlhf_harmless_dev.jsonl.gz
    python scripts/smollm2_hh.py --rm_workdir=runs/smol_hh_rm    # → experiments/results/smollm2_hh_rm.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh_rlhf_harmless_dev.jsonl.gz")  # the shared sample


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rm_workdir", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "smollm2_hh_rm.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from rlhf_jax.metrics import read_metrics

    rows = [r for r in read_metrics(args.rm_workdir) if "eval/rm/accuracy" in r]
    if not rows:
        sys.exit(f"error: {args.rm_workdir} has no eval/rm/accuracy in its metrics.jsonl; run the RM first.")
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import rm_baselines

    base = rm_baselines.main(["--path", HH, "--eval_lines", "1500", "1800"])
    last = rows[-1]
    n, acc = base["pairs"], last["eval/rm/accuracy"]
    best = max(base[f"{side}_wins/{unit}"] for side in ("shorter", "longer") for unit in ("chars", "words"))
    out = {
        "rm_workdir": args.rm_workdir,
        "step": last["step"],
        "eval_pairs": n,
        "rm_accuracy": acc,
        "rm_se": se(acc, n),
        "length_baselines": {k: v for k, v in base.items() if "wins" in k},
        "best_length_baseline": best,
        "best_length_se": se(best, n),
        "margin_in_rm_se": (acc - best) / se(acc, n),
        "over_time": [{"step": r["step"], "accuracy": r["eval/rm/accuracy"]} for r in rows],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
