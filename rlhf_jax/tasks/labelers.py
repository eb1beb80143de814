"""Simulated labelers: rank K responses by the gold score plus Gaussian noise.

A labeler sees score_i + noise * N(0, 1) for each response and ranks best first, so two
responses whose gold scores differ by d are put in gold order with probability
Phi(d / (noise * sqrt(2))). DEFAULT_NOISE is calibrated so that on SFT-like samples
(`demonstrator.sft_like_responses`, K=4) a labeler agrees with the gold order on 75% of
the pairs with different gold scores, close to InstructGPT's ~73% inter-labeler agreement
(tests/test_builtin_task.py measures it). The noise is large next to the score range because
gold-score gaps are mostly large (a correct answer 1.0 against a wrong single word 0.0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks.builtin_text import write_text_if_changed
from rlhf_jax.tasks.instructions import parse_instruction
from rlhf_jax.tasks.judge import clean_response, gold_score

# Std of the Gaussian noise on gold scores (which lie in [0, 1]). Measured agreement with the
# gold order on 3000 prompts of SFT-like samples: 0.30 -> 0.90, 0.50 -> 0.80, 0.65 -> 0.751, 0.80 -> 0.71.
DEFAULT_NOISE = 0.65


def rank_responses(
    prompt: str, responses: Sequence[str], rng: np.random.Generator, noise: float = DEFAULT_NOISE
) -> list[int]:
    """Indices of `responses`, best first, by noisy gold score; noise=0 ranks by the gold score
    (ties by position)."""
    if noise < 0:
        raise ValueError(f"noise={noise} must be >= 0 (the std of the labeler's score noise).")
    scores = np.asarray([gold_score(prompt, r) for r in responses], np.float64)
    noisy = scores + noise * rng.standard_normal(len(scores)) if noise > 0 else scores
    return [int(i) for i in np.argsort(-noisy, kind="stable")]


def pairwise_agreement(scores: Sequence[float], ranking: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared): over pairs with different `scores`, how many `ranking` orders
    the higher-scored one first."""
    position = {idx: pos for pos, idx in enumerate(ranking)}
    agree = compared = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if scores[i] != scores[j]:
                compared += 1
                agree += (scores[i] > scores[j]) == (position[i] < position[j])
    return agree, compared


def write_comparisons(
    path: str,
    prompts: Sequence[str],
    samples_per_prompt: Sequence[Sequence[str]],
    seed: int = 0,
    noise: float = DEFAULT_NOISE,
) -> str:
    """Ranks each prompt's samples and writes ranked JSONL {"prompt", "responses", "ranking"}; returns path.

    prompts: instructions or decoded chat prompts; "prompt" is written as the instruction
      text alone, since the comparison reader renders it as a single user turn (a system turn,
      if any, is dropped — the built-in prompts for RM/PPO have none).
    samples_per_prompt: K >= 2 responses per prompt, decoded; they are written cleaned (text
      up to the first role tag, stripped) so no literal "<|end|>" reaches the reward model.
      Responses that are empty once cleaned are left out (the comparison reader rejects empty
      responses), and so is a prompt left with fewer than 2.
    """
    if len(prompts) != len(samples_per_prompt):
        raise ValueError(
            f"write_comparisons: {len(prompts)} prompts but {len(samples_per_prompt)} sample "
            f"lists; pass one list of responses per prompt."
        )
    rng = np.random.default_rng(seed)
    lines = []
    for i, (prompt, samples) in enumerate(zip(prompts, samples_per_prompt)):
        if len(samples) < 2:
            raise ValueError(
                f"write_comparisons: prompt {i} ({prompt!r:.80}) has {len(samples)} responses; "
                f"ranking needs K >= 2 samples per prompt."
            )
        instruction, responses = parse_instruction(prompt), [c for r in samples if (c := clean_response(r))]
        if len(responses) < 2:
            continue
        ranking = rank_responses(instruction, responses, rng, noise)
        lines.append(json.dumps({"prompt": instruction, "responses": responses, "ranking": ranking}))
    write_text_if_changed(path, "".join(line + "\n" for line in lines))
    return path
