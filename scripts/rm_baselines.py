"""Held-out pairwise accuracy of trivial length baselines, the floor a reward model must beat.

    python scripts/rm_baselines.py --path ../shared/data/hh_rlhf_harmless_dev.jsonl.gz \
        --eval_lines 1500 1800 [--format hh_rlhf] [--json out.json]

For every compared pair (i preferred to j) of the comparisons in the line range:
  shorter  predicts the shorter final response wins;
  longer   predicts the longer one wins;
ties count 1/2, so both sit at 0.5 on data where length says nothing, and
shorter + longer = 1. Length is counted in characters and in whitespace words.
Records the reader skips as defective (HH-RLHF's empty responses) are left out,
as the RM stage leaves them out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rlhf_jax.data import comparisons  # noqa: E402

UNITS = {"chars": len, "words": lambda s: len(s.split())}


def pair_lengths(records: list[dict], unit: str) -> list[tuple[int, int]]:
    """(preferred, other) lengths of every pair i < j of each comparison (responses are best first)."""
    size = UNITS[unit]
    out = []
    for r in records:
        lengths = [size(x) for x in r["responses"]]
        out += [(lengths[i], lengths[j]) for i in range(len(lengths)) for j in range(i + 1, len(lengths))]
    return out


def accuracy(pairs: list[tuple[int, int]], prefer_shorter: bool) -> float:
    """Fraction of pairs the length rule gets right; a tie counts 1/2."""
    score = 0.0
    for good, bad in pairs:
        if good == bad:
            score += 0.5
        elif (good < bad) == prefer_shorter:
            score += 1.0
    return score / len(pairs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="comparisons JSONL(.gz)")
    p.add_argument("--format", default="hh_rlhf", choices=comparisons.FORMATS)
    p.add_argument(
        "--eval_lines",
        type=int,
        nargs=2,
        metavar=("START", "STOP"),
        default=None,
        help="held-out line range [START, STOP), counted from 0 (default: the whole file)",
    )
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    line_range = tuple(args.eval_lines) if args.eval_lines else None
    records = comparisons.read_comparisons(args.path, args.format, line_range=line_range)
    result = {"path": args.path, "line_range": list(line_range) if line_range else None, "comparisons": len(records)}
    for unit in UNITS:
        pairs = pair_lengths(records, unit)
        result["pairs"] = len(pairs)
        result[f"shorter_wins/{unit}"] = accuracy(pairs, prefer_shorter=True)
        result[f"longer_wins/{unit}"] = accuracy(pairs, prefer_shorter=False)
        result[f"ties/{unit}"] = sum(a == b for a, b in pairs) / len(pairs)
    print(f"{args.path} lines {line_range or 'all'}: {result['comparisons']} comparisons, {result['pairs']} pairs")
    for unit in UNITS:
        print(
            f"  by {unit:5s}: shorter wins {result[f'shorter_wins/{unit}']:.4f}   longer wins "
            f"{result[f'longer_wins/{unit}']:.4f}   (ties {result[f'ties/{unit}']:.4f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
