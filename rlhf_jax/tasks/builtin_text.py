"""The built-in corpus and demonstrations, generated offline and deterministically.

So the tiny presets and the tests run without any external file. Both describe the task's
world (`world`'s vocabulary, `instructions`' kinds):

- `write_builtin_corpus`: English-like text from a small grammar (subjects, verbs, objects,
  numbers, sums, dialogue, paragraphs) with worked examples of the instructions — some with
  wrong answers, as web text has — and FORBIDDEN words sprinkled in at a set rate.
- `write_builtin_sft`: JSONL demonstrations ("reverse: a b c" -> "c b a", ...), in both record
  formats, from a demonstrator that errs at `error_rate` (0 by default: all correct).
- `solve_instruction` (from `rlhf_jax.tasks.instructions`): the correct response to any instruction.

Only training-split instances (`rlhf_jax.tasks.instructions.split_of`) appear here, so held-out
evaluation prompts are never seen in pretraining or SFT. Randomness uses only
`random.Random(seed).random()`, whose sequence Python guarantees across versions, so the same
seed writes the same bytes everywhere.
"""

from __future__ import annotations

import json
import os
import random

from rlhf_jax.tasks.demonstrator import DEFAULT_CHATTER_RATE, DEFAULT_FORBIDDEN_PROB, demonstrate
from rlhf_jax.tasks.instructions import SYSTEM_PROMPT, sample_instruction, solve_instruction
from rlhf_jax.tasks.world import ADJECTIVES, FORBIDDEN, NAMES, NOUNS, PLACES, TIMES, VERBS, pick, rand_int

__all__ = ["write_builtin_corpus", "write_builtin_sft", "solve_instruction", "write_text_if_changed"]

DEFAULT_WRONG_RATE = 0.2  # share of worked examples in the corpus with a wrong answer
DEFAULT_FORBIDDEN_RATE = 0.03  # share of corpus sentences with a FORBIDDEN word inserted


def write_builtin_corpus(
    path: str,
    num_chars: int = 200_000,
    seed: int = 0,
    wrong_rate: float = DEFAULT_WRONG_RATE,
    forbidden_rate: float = DEFAULT_FORBIDDEN_RATE,
) -> str:
    """Writes exactly `num_chars` characters (ASCII, ends with a newline) to `path`; returns path.

    About a quarter of the sentences are worked examples ("Anna wrote sort: 3 1 and the answer
    was 1 3." or "Task: sort: 3 1 Answer: 1 3."); `wrong_rate` of their answers are corrupted
    by the noisy demonstrator. Each sentence gets a FORBIDDEN word with probability `forbidden_rate`.
    """
    rng = random.Random(seed)
    parts, size = [], 0
    while size < num_chars:
        # Sentences run on within a line; some lines break early, paragraphs end with a blank line.
        paragraph = "".join(
            _sentence(rng, wrong_rate, forbidden_rate) + ("\n" if rng.random() < 0.25 else " ")
            for _ in range(1 + rand_int(rng, 6))
        )
        paragraph = paragraph.rstrip(" \n") + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    text = "".join(parts)[: max(num_chars - 1, 0)] + "\n" * (num_chars > 0)
    write_text_if_changed(path, text)
    return path


def write_builtin_sft(
    path: str,
    num_examples: int = 2000,
    seed: int = 0,
    error_rate: float = 0.0,
    forbidden_prob: float = DEFAULT_FORBIDDEN_PROB,
    chatter_rate: float = DEFAULT_CHATTER_RATE,
) -> str:
    """Writes `num_examples` JSONL demonstrations to `path`; returns path.

    About half are {"prompt", "response"}; the rest {"messages": [...]} with an optional
    system turn and sometimes a second user/assistant exchange. Each assistant response is
    wrong with probability `error_rate`, and a wrong one inserts a FORBIDDEN word with probability
    `forbidden_prob`; each ends with a chatty remark with probability `chatter_rate` (see
    `rlhf_jax.tasks.demonstrator`).
    """
    rng = random.Random(seed)
    respond = lambda instruction: demonstrate(instruction, rng, error_rate, forbidden_prob, chatter_rate)
    lines = []
    for _ in range(num_examples):
        instruction = sample_instruction(rng)
        if rng.random() < 0.5:
            record = {"prompt": instruction, "response": respond(instruction)}
        else:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
            for _ in range(1 + (rng.random() < 0.25)):
                turn = sample_instruction(rng) if messages and messages[-1]["role"] == "assistant" else instruction
                messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": respond(turn)}]
            record = {"messages": messages}
        lines.append(json.dumps(record, sort_keys=True))
    write_text_if_changed(path, "".join(line + "\n" for line in lines))
    return path


def write_text_if_changed(path: str, text: str) -> None:
    """Atomic write; an identical existing file is left untouched so its mtime (part of the
    dataset cache key) does not change."""
    data = text.encode("utf-8")
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _sentence(rng: random.Random, wrong_rate: float, forbidden_rate: float) -> str:
    sentence = _plain_sentence(rng, wrong_rate)
    if rng.random() < forbidden_rate:
        words = sentence.split(" ")
        words.insert(1 + rand_int(rng, len(words)), pick(rng, FORBIDDEN))  # never first: keeps capitals
        sentence = " ".join(words)
    return sentence


def _plain_sentence(rng: random.Random, wrong_rate: float) -> str:
    kind = rand_int(rng, 8)
    a, b = rand_int(rng, 20), rand_int(rng, 20)
    if kind == 0:
        return f"{pick(rng, NAMES)} has {a} {pick(rng, NOUNS)}s and {b} {pick(rng, NOUNS)}s."
    if kind == 1:
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        said = pick(rng, ("Come here", "Look at the " + pick(rng, NOUNS), "I see it"))
        return f'"{said}," said {pick(rng, NAMES)}.'
    if kind == 3:
        return (
            f"Does the {pick(rng, NOUNS)} {pick(rng, VERBS)[0]} the {pick(rng, NOUNS)}? "
            f"{pick(rng, ('Yes, it does.', 'No, it does not.'))}"
        )
    if kind == 4:
        return (
            f"{pick(rng, TIMES)}, {pick(rng, NAMES)} {pick(rng, VERBS)[1]} a {pick(rng, ADJECTIVES)} "
            f"{pick(rng, NOUNS)} {pick(rng, PLACES)}."
        )
    if kind in (5, 6):  # worked examples, so demonstrations reuse the pretraining vocabulary
        instruction = sample_instruction(rng)
        answer = demonstrate(instruction, rng, wrong_rate)
        if kind == 5:
            return f"{pick(rng, NAMES)} wrote {instruction} and the answer was {answer}."
        return f"Task: {instruction} Answer: {answer}."
    return (
        f"The {pick(rng, ADJECTIVES)} {pick(rng, NOUNS)} {pick(rng, VERBS)[1]} the {pick(rng, NOUNS)}; "
        f"then {pick(rng, NAMES)} {pick(rng, VERBS)[1]} it."
    )
