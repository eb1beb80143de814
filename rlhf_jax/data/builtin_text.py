"""A small built-in corpus and demonstration set, generated offline and deterministically.

So the tiny presets and the tests run without any external file:

- `write_builtin_corpus`: English-like text from a small grammar (subjects, verbs,
  objects, numbers, sums, dialogue, punctuation, paragraphs).
- `write_builtin_sft`: JSONL demonstrations of simple word/number tasks
  ("reverse: a b c" -> "c b a", "add 3 4" -> "7", ...), in both record formats.
  `solve_instruction` computes the correct response for any such instruction.

Randomness uses only `random.Random(seed).random()`, whose sequence Python guarantees
across versions, so the same seed writes the same bytes everywhere.
"""

from __future__ import annotations

import json
import os
import random

NAMES = ("Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Henry", "Iris", "Jack")
NOUNS = ("cat", "dog", "bird", "fox", "tree", "river", "house", "boat", "apple", "stone", "horse", "garden",
         "book", "lamp", "road", "hill", "cloud", "ship", "bell", "door")
ADJECTIVES = ("small", "big", "red", "green", "old", "young", "quiet", "bright", "dark", "happy", "cold", "warm")
VERBS = (("see", "sees"), ("find", "finds"), ("like", "likes"), ("paint", "paints"), ("follow", "follows"),
         ("carry", "carries"), ("watch", "watches"), ("build", "builds"), ("open", "opens"), ("hear", "hears"))
PLACES = ("in the garden", "by the river", "on the hill", "near the house", "under the tree", "at the door")
TIMES = ("In the morning", "At night", "Today", "After the rain", "Once", "Later")
WORDS = NOUNS + ADJECTIVES + ("sun", "moon", "star", "rain", "wind", "snow", "fire", "sand", "milk", "bread")
TASKS = ("copy", "reverse", "sort", "add", "count", "first", "last")
SYSTEM_PROMPT = "Answer with the result only."


def write_builtin_corpus(path: str, num_chars: int = 200_000, seed: int = 0) -> str:
    """Writes exactly `num_chars` characters (ASCII, ends with a newline) to `path`; returns path."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < num_chars:
        # Sentences run on within a line; some lines break early, paragraphs end with a blank line.
        paragraph = "".join(_sentence(rng) + ("\n" if rng.random() < 0.25 else " ") for _ in range(1 + _int(rng, 6)))
        paragraph = paragraph.rstrip(" \n") + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    text = "".join(parts)[:max(num_chars - 1, 0)] + "\n" * (num_chars > 0)
    _write_if_changed(path, text)
    return path


def write_builtin_sft(path: str, num_examples: int = 2000, seed: int = 0) -> str:
    """Writes `num_examples` JSONL demonstrations to `path`; returns path.

    About half are {"prompt", "response"}; the rest {"messages": [...]} with an optional
    system turn and sometimes a second user/assistant exchange.
    """
    rng = random.Random(seed)
    lines = []
    for _ in range(num_examples):
        instruction = _instruction(rng)
        if rng.random() < 0.5:
            record = {"prompt": instruction, "response": solve_instruction(instruction)}
        else:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
            for _ in range(1 + (rng.random() < 0.25)):
                turn = _instruction(rng) if messages and messages[-1]["role"] == "assistant" else instruction
                messages += [{"role": "user", "content": turn},
                             {"role": "assistant", "content": solve_instruction(turn)}]
            record = {"messages": messages}
        lines.append(json.dumps(record, sort_keys=True))
    _write_if_changed(path, "".join(line + "\n" for line in lines))
    return path


def solve_instruction(instruction: str) -> str:
    """The correct response to an instruction of the built-in tasks, e.g. "sort: 5 2 9" -> "2 5 9"."""
    head, _, rest = instruction.partition(":") if ":" in instruction else instruction.partition(" ")
    args = rest.split()
    if head == "copy":
        return " ".join(args)
    if head == "reverse":
        return " ".join(reversed(args))
    if head == "sort":
        return " ".join(sorted(args, key=lambda a: (not a.isdigit(), int(a) if a.isdigit() else 0, a)))
    if head == "add":
        return str(sum(int(a) for a in args))
    if head == "count":
        return str(len(args))
    if head == "first":
        return args[0]
    if head == "last":
        return args[-1]
    raise ValueError(f"unknown built-in task {head!r} in {instruction!r}; tasks are {TASKS}.")


def _instruction(rng: random.Random) -> str:
    task = _pick(rng, TASKS)
    if task == "add":
        return f"add {_int(rng, 50)} {_int(rng, 50)}"
    if task == "sort":
        return "sort: " + " ".join(str(_int(rng, 20)) for _ in range(2 + _int(rng, 4)))
    return f"{task}: " + " ".join(_pick(rng, WORDS) for _ in range(2 + _int(rng, 4)))


def _sentence(rng: random.Random) -> str:
    kind = _int(rng, 7)
    a, b = _int(rng, 20), _int(rng, 20)
    if kind == 0:
        return f"{_pick(rng, NAMES)} has {a} {_pick(rng, NOUNS)}s and {b} {_pick(rng, NOUNS)}s."
    if kind == 1:
        return f"{a} plus {b} is {a + b}."
    if kind == 2:
        said = _pick(rng, ("Come here", "Look at the " + _pick(rng, NOUNS), "I see it"))
        return f'"{said}," said {_pick(rng, NAMES)}.'
    if kind == 3:
        return (f"Does the {_pick(rng, NOUNS)} {_pick(rng, VERBS)[0]} the {_pick(rng, NOUNS)}? "
                f"{_pick(rng, ('Yes, it does.', 'No, it does not.'))}")
    if kind == 4:
        return (f"{_pick(rng, TIMES)}, {_pick(rng, NAMES)} {_pick(rng, VERBS)[1]} a {_pick(rng, ADJECTIVES)} "
                f"{_pick(rng, NOUNS)} {_pick(rng, PLACES)}.")
    if kind == 5:  # the task words, so demonstrations reuse the pretraining vocabulary
        instruction = _instruction(rng)
        return f"{_pick(rng, NAMES)} wrote {instruction} and the answer was {solve_instruction(instruction)}."
    return (f"The {_pick(rng, ADJECTIVES)} {_pick(rng, NOUNS)} {_pick(rng, VERBS)[1]} the {_pick(rng, NOUNS)}; "
            f"then {_pick(rng, NAMES)} {_pick(rng, VERBS)[1]} it.")


def _int(rng: random.Random, n: int) -> int:
    """Uniform in [0, n) from rng.random() alone (its sequence is stable across Python versions)."""
    return int(rng.random() * n)


def _pick(rng: random.Random, items: tuple[str, ...]) -> str:
    return items[_int(rng, len(items))]


def _write_if_changed(path: str, text: str) -> None:
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
