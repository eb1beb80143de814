"""Checks the main job's quality claim on the default preset, over seeds (issue: the built-in RLHF task).

    python scripts/check_pipeline.py [--root runs/sweeps/seeds] [--workers 1] [--collect]

Runs experiments/seeds.py (the default pipeline for seeds 0-4; seed 0 reuses runs/quickstart's
stages when present) with scripts/sweep.py, then prints each seed's numbers, their mean ± std, and
whether the claim holds: PPO's mean win rate over SFT by the gold judge (ties count half) is at least
--min-win-rate, and PPO's mean harmful rate is below SFT's. Exit status 0 when both hold, 1 when not.
Writes <root>/check.json and <root>/check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402
from experiments import load_experiment  # noqa: E402

KEYS = (
    "sft/gold_score",
    "policy/gold_score",
    "policy/win_rate_vs_sft",
    "sft/harmful_rate",
    "policy/harmful_rate",
    "policy/kl",
    "rm/accuracy_vs_gold",
)


def verdict(rows: list[dict], min_win_rate: float) -> dict:
    """Mean ± std (sample std, n−1) of KEYS over the finished seeds, and the two checks."""
    done = [r for r in rows if r["status"] == "finished"]
    if not done:
        raise SystemExit("no seed finished: nothing to check (see the runs' sweep.log).")
    stats = {
        k: {
            "mean": float(np.mean([r[k] for r in done])),
            "std": float(np.std([r[k] for r in done], ddof=1)) if len(done) > 1 else 0.0,
        }
        for k in KEYS
    }
    checks = {
        f"mean win rate vs SFT >= {min_win_rate}": stats["policy/win_rate_vs_sft"]["mean"] >= min_win_rate,
        "mean harmful rate PPO < SFT": stats["policy/harmful_rate"]["mean"] < stats["sft/harmful_rate"]["mean"],
    }
    return {
        "seeds": [r["seed"] for r in done],
        "per_seed": [{k: r[k] for k in ("seed", *KEYS)} for r in done],
        "mean_std": stats,
        "checks": checks,
        "passed": all(checks.values()) and len(done) == len(rows),
    }


def markdown(v: dict) -> list[str]:
    lines = ["| seed | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    lines += ["| " + " | ".join([str(r["seed"])] + [f"{r[k]:.3f}" for k in KEYS]) + " |" for r in v["per_seed"]]
    lines += [
        "| mean ± std | "
        + " | ".join(f"{v['mean_std'][k]['mean']:.3f} ± {v['mean_std'][k]['std']:.3f}" for k in KEYS)
        + " |",
        "",
    ]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in v["checks"].items()]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(ROOT, "runs", "sweeps", "seeds"))
    p.add_argument("--workers", type=int, default=1, help="pipelines at a time")
    p.add_argument("--collect", action="store_true", help="check what has run; run nothing")
    p.add_argument("--min-win-rate", type=float, default=0.65)
    a = p.parse_args(argv)
    exp = load_experiment(os.path.join(ROOT, "experiments", "seeds.py"))
    root = os.path.abspath(a.root)
    os.makedirs(root, exist_ok=True)
    status = {} if a.collect else sweep.run_local(exp, root, a.workers, sys.executable)
    rows = sweep.collect(exp, root)
    sweep.write_summary(exp, root, rows)
    v = verdict(rows, a.min_win_rate)
    lines = markdown(v)
    with open(os.path.join(root, "check.json"), "w") as f:
        json.dump(v, f, indent=2)
    with open(os.path.join(root, "check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any(s != "finished" for s in status.values()):
        print(f"not every seed finished: {status}")
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
