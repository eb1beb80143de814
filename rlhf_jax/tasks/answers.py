"""Verifiable rewards from a ground-truth column, as GRPO is run on GSM8K-style data: a prompts JSONL of
{"prompt": ..., "answer": ...} and reward functions that check each response against its own record's answer
(config.reward.function receives the records' columns: rlhf_jax/rewards.py).

    python -m rlhf_jax.tasks.answers --out=runs/answers.jsonl --n=512     # an example file (below)
    python -m rlhf_jax.main --config=configs/grpo.py --workdir=runs/grpo_answers \\
        --config.init_from=<your policy> --config.data.prompts_path=runs/answers.jsonl \\
        --config.reward.kind=function \\
        --config.reward.function=rlhf_jax.tasks.answers:exact_answer,rlhf_jax.tasks.answers:answer_overlap \\
        --config.reward.weights='(1.0, 0.5)'

Each function's batch mean is logged as reward/exact_answer and reward/answer_overlap; the policy is trained
on 1.0 · exact_answer + 0.5 · answer_overlap.

The example file is the built-in task's instructions ("sort: 5 2 9") with their solutions ("2 5 9") as the
answer column: the same task as the gold judge's, read from the data instead of computed from the prompt.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks.judge import normalise, word_edit_distance


def exact_answer(prompts: Sequence[str], responses: Sequence[str], tokens, mask, answer) -> np.ndarray:
    """1 where the response equals its record's answer after normalisation (case, commas, final
    punctuation, anything after the end-of-turn tag), else 0."""
    return np.asarray([float(normalise(r) == normalise(str(a))) for r, a in zip(responses, answer, strict=True)])


def answer_overlap(prompts: Sequence[str], responses: Sequence[str], tokens, mask, answer) -> np.ndarray:
    """Partial credit in [0, 1]: 1 − word edit distance to the answer / the longer one's length (the gold
    judge's credit), a denser signal than exact_answer for a policy that is not yet right."""
    out = []
    for r, a in zip(responses, answer, strict=True):
        words, target = normalise(r), normalise(str(a))
        out.append(1.0 - word_edit_distance(words, target) / max(len(words), len(target), 1))
    return np.asarray(out, np.float32)


def write_answer_prompts(path: str, n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> str:
    """`n` distinct train-split built-in instructions as {"prompt": instruction, "answer": its solution}."""
    from rlhf_jax.tasks.builtin_text import write_text_if_changed
    from rlhf_jax.tasks.instructions import KINDS, sample_instruction, solve_instruction

    kinds = tuple(kinds or (k for k in KINDS if k != "context"))  # short prompts: context ones run ~80 tokens
    rng, seen = random.Random(seed), {}
    for _ in range(100 * n):
        if len(seen) == n:
            break
        instruction = sample_instruction(rng, "train", kinds)
        seen.setdefault(instruction, solve_instruction(instruction))
    if len(seen) < n:
        raise ValueError(f"write_answer_prompts: only {len(seen)} distinct instructions of {kinds}; ask for fewer.")
    write_text_if_changed(path, "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in seen.items()))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSONL to write")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_answer_prompts(args.out, args.n, args.seed))


if __name__ == "__main__":
    main()
