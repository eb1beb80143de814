"""A synthetic preference with a known rule, for tests and the `tiny` RM preset.

Each prompt has K=4 responses of 6 words; a response is better the more of its
words are "bright" words. Rankings follow that count exactly, so a reward model
that learns the rule ranks held-out responses (almost) perfectly.
"""

from __future__ import annotations

import json
import os

import numpy as np

BRIGHT = ("sun", "gold", "joy", "kind", "calm", "warm")
DARK = ("mud", "rot", "grim", "cold", "dull", "gray")
PROMPTS = ("describe the day", "tell me about the town", "how was the trip", "what did you see")


def examples(n: int, seed: int, k: int = 4, words: int = 6) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        counts = rng.choice(words + 1, size=k, replace=False)  # distinct, so the ranking is strict
        responses = []
        for c in counts:
            ws = list(rng.choice(BRIGHT, c)) + list(rng.choice(DARK, words - c))
            rng.shuffle(ws)
            responses.append(" ".join(ws))
        ranking = [int(i) for i in np.argsort(-counts)]
        out.append({"prompt": str(rng.choice(PROMPTS)), "responses": responses, "ranking": ranking})
    return out


def write(data_dir: str, seed: int = 0, n_train: int = 2000, n_eval: int = 200) -> tuple[str, str]:
    """Writes train/eval JSONL (ranked format) into data_dir; returns their paths."""
    os.makedirs(data_dir, exist_ok=True)
    paths = []
    for name, n, s in (("builtin_prefs_train.jsonl", n_train, seed), ("builtin_prefs_eval.jsonl", n_eval, seed + 1)):
        path = os.path.join(data_dir, name)
        text = "".join(json.dumps(e) + "\n" for e in examples(n, s))
        if _read(path) != text:  # rewriting an unchanged file would needlessly invalidate built datasets
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths[0], paths[1]


def _read(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()
