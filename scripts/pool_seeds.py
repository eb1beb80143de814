"""Joins a head-to-head analysis kept only as its results (its runs gone) with further seeds' runs.

    python scripts/pool_seeds.py --earlier experiments/results/pg_toolkit_seeds_0_1_2 \
        --root runs/sweeps/algorithms --out experiments/results/pg_toolkit_seeds_0_4

--earlier holds aggregate.json and paired_vs_ppo.json of seeds 0..k (experiments/algorithms.py's analysis);
--root is the sweep root of experiments/algorithms.py holding the later seeds' finished runs (seed 0 must not be
among them). Writes to --out: aggregate.json and paired_vs_ppo.json over all the seeds, the same numbers the
analysis gives on all the runs together (experiments.algorithms.pooled), runs.csv (the later seeds' rows, so the
next pooling has them), and the analysis's report of them (experiments.algorithms.report: summary.md, which it
prints, and gold_vs_kl.png).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import sweep  # noqa: E402
from experiments import algorithms as h2h, load_experiment  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--earlier", required=True, help="directory with the earlier aggregate.json, paired_vs_ppo.json")
    p.add_argument("--root", required=True, help="experiments/algorithms.py's sweep root with the later seeds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with open(os.path.join(args.earlier, "aggregate.json")) as f:
        earlier = json.load(f)
    with open(os.path.join(args.earlier, "paired_vs_ppo.json")) as f:
        earlier_paired = json.load(f)
    exp = load_experiment(os.path.join(ROOT, "experiments", "algorithms.py"))
    rows = [r for r in sweep.collect(exp, args.root) if r["status"] == "finished"]
    if not rows:
        raise SystemExit(f"{args.root}: no finished run of experiments/algorithms.py; run its later seeds first.")
    stats, paired = h2h.pooled(earlier, earlier_paired, rows, root=args.root)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = "\n".join(h2h.report(stats, paired, args.out))  # also aggregate.json, paired_vs_ppo.json, the plot
    print(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
