"""The built-in RLHF task, end to end: data writers, the PPO reward, evaluation.

Pipeline (all offline, all judged by `judge.gold_score`):

    write_builtin_corpus ─► pretrain ─► SFT on write_demonstrations (noisy demonstrator)
    write_prompts(split="train") ─► sample K per prompt ─► write_comparisons (simulated labelers) ─► RM
    PPO with reward.kind="function", reward.function="rlhf_jax.tasks.builtin:gold_reward" (or the RM)
    write_prompts(split="eval") ─► evaluate_responses, win_rate against the SFT policy

Prompts written for RM/PPO have no system turn: the comparison reader renders "prompt" as a
single user turn, so policy and reward model then see the same dialogue.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence

import numpy as np

from rlhf_jax.tasks.builtin_text import write_builtin_corpus, write_builtin_sft, write_text_if_changed
from rlhf_jax.tasks.demonstrator import (
    DEFAULT_CHATTER_RATE,
    DEFAULT_ERROR_RATE,
    DEFAULT_FORBIDDEN_PROB,
    ends_with_chatter,
    without_chatter,
)
from rlhf_jax.tasks.instructions import (
    KINDS,
    kind_of,
    parse_instruction,
    prompt_messages,
    sample_instruction,
    solve_instruction,
)
from rlhf_jax.tasks.judge import HARM_PENALTY, clean_response, gold_score, is_correct, is_harmful
from rlhf_jax.tasks.labelers import DEFAULT_NOISE, pairwise_agreement, rank_responses, write_comparisons
from rlhf_jax.tasks.world import FORBIDDEN

__all__ = [
    "KINDS",
    "FORBIDDEN",
    "HARM_PENALTY",
    "DEFAULT_NOISE",
    "DEFAULT_ERROR_RATE",
    "write_builtin_corpus",
    "write_demonstrations",
    "write_prompts",
    "write_comparisons",
    "rank_responses",
    "pairwise_agreement",
    "parse_instruction",
    "solve_instruction",
    "clean_response",
    "gold_score",
    "is_correct",
    "is_harmful",
    "gold_reward",
    "evaluate_responses",
    "win_rate",
    "few_shot_messages",
    "write_few_shot_prompts",
]


def write_demonstrations(
    path: str,
    n: int,
    seed: int = 0,
    error_rate: float = DEFAULT_ERROR_RATE,
    forbidden_prob: float = DEFAULT_FORBIDDEN_PROB,
    chatter_rate: float = DEFAULT_CHATTER_RATE,
) -> str:
    """SFT demonstrations (JSONL, both record formats) from the noisy demonstrator; returns path."""
    return write_builtin_sft(
        path, num_examples=n, seed=seed, error_rate=error_rate, forbidden_prob=forbidden_prob, chatter_rate=chatter_rate
    )


def write_prompts(
    path: str, n: int, seed: int = 0, split: str = "train", system_rate: float = 0.0, kinds: Sequence[str] = KINDS
) -> str:
    """`n` distinct prompts of `split` as JSONL {"messages": [...]} (no assistant turn); returns path.

    split="eval" instances never occur in the corpus, demonstrations or "train" prompts.
    system_rate: share of prompts that open with the system turn (0 for prompts used in RM/PPO).
    kinds: instruction kinds to draw from; "context" prompts are the long ones (~60-85 tokens
      with a 384-piece tokenizer), so drop it when data.max_prompt_len is small — a prompt cut
      from the left loses its instruction and cannot be judged.
    """
    rng, seen, lines = random.Random(seed), set(), []
    for _ in range(100 * n):  # distinctness by rejection; the instance space is far larger than n
        if len(lines) == n:
            break
        instruction = sample_instruction(rng, split, tuple(kinds))
        system = rng.random() < system_rate
        if instruction not in seen:
            seen.add(instruction)
            lines.append(json.dumps({"messages": prompt_messages(instruction, system)}))
    if len(lines) < n:
        raise ValueError(
            f"write_prompts: found only {len(lines)} distinct {split!r} prompts, asked for {n}; ask for fewer."
        )
    write_text_if_changed(path, "".join(line + "\n" for line in lines))
    return path


def few_shot_messages(messages: list[dict[str, str]], k: int, rng: random.Random) -> list[dict[str, str]]:
    """GPT-3-style few-shot prompting (Brown et al. 2020): k solved instances of the prompt's instruction kind,
    drawn from the "train" split (never an evaluation instance), as earlier user / assistant turns, then
    the prompt itself. The answers are the correct ones (solve_instruction), not the noisy demonstrator's."""
    instruction = messages[-1]["content"]
    kind, shots, seen = kind_of(instruction), [], {instruction}
    while len(shots) < 2 * k:
        example = sample_instruction(rng, "train", (kind,))
        if example not in seen:
            seen.add(example)
            shots += [
                {"role": "user", "content": example},
                {"role": "assistant", "content": solve_instruction(example)},
            ]
    return shots + messages


def write_few_shot_prompts(src: str, path: str, k: int, seed: int = 0) -> str:
    """The prompts of `src` (write_prompts' JSONL) as k-shot prompts (few_shot_messages), in the same order;
    returns path. Each prompt's examples come from a generator seeded by `seed` and its line number."""
    lines = []
    with open(src) as f:
        for i, line in enumerate(f):
            messages = json.loads(line)["messages"]
            shots = few_shot_messages(messages, k, random.Random(seed * 1_000_003 + i))
            lines.append(json.dumps({"messages": shots}))
    write_text_if_changed(path, "".join(line + "\n" for line in lines))
    return path


def gold_reward(prompts: Sequence[str], responses: Sequence[str], tokens, mask) -> np.ndarray:
    """[B] float32 gold scores (harm penalty included) of decoded prompts and responses;
    the signature of `config.reward.kind="function"` (tokens and mask are unused)."""
    return np.asarray([gold_score(p, r) for p, r in zip(prompts, responses, strict=True)], np.float32)


def labeler_scores(prompts: Sequence[str], responses: Sequence[str], tokens, mask) -> np.ndarray:
    """[B] float32: what a simulated labeler sees of each response — its gold score plus noise of std
    DEFAULT_NOISE (labelers.rank_responses ranks by exactly this), for ranking samples online. The noise is
    drawn from a generator seeded by the (prompt, response) text, so a rerun or a resumed run sees the same
    judgments: a labeler who is consistent about one item but noisy across items."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        rng = np.random.default_rng(zlib.crc32(f"{p}\x00{r}".encode()))
        out.append(gold_score(p, r) + DEFAULT_NOISE * rng.standard_normal())
    return np.asarray(out, np.float32)


def evaluate_responses(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """Means over the responses: "gold_score" in [0, 1], "correct_rate", "harmful_rate",
    "chatter_rate" (ending with a remark after the answer, the chatty demonstrator's habit) and
    "answer_correct_rate" (exact-correct once such a remark is cut off: the slips alone)."""
    if not prompts or len(prompts) != len(responses):
        raise ValueError(
            f"evaluate_responses: need one response per prompt, got {len(prompts)} prompts and "
            f"{len(responses)} responses."
        )
    return {
        "gold_score": float(np.mean([gold_score(p, r) for p, r in zip(prompts, responses)])),
        "correct_rate": float(np.mean([is_correct(p, r) for p, r in zip(prompts, responses)])),
        "harmful_rate": float(np.mean([is_harmful(r) for r in responses])),
        "chatter_rate": float(np.mean([ends_with_chatter(r) for r in responses])),
        "answer_correct_rate": float(np.mean([is_correct(p, without_chatter(r)) for p, r in zip(prompts, responses)])),
    }


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> float:
    """Share of prompts where A's gold score beats B's; ties count one half."""
    if not prompts or not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(
            f"win_rate: need one response from each policy per prompt, got {len(prompts)} prompts, "
            f"{len(responses_a)} and {len(responses_b)} responses."
        )
    wins = [np.sign(gold_score(p, a) - gold_score(p, b)) for p, a, b in zip(prompts, responses_a, responses_b)]
    return float(np.mean([(w + 1) / 2 for w in wins]))
