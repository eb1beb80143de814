"""Programmatic reward functions for `config.reward.kind="function"` (verifiable tasks, tests).

Signature: fn(prompts: list[str], responses: list[str], tokens [B, N], mask [B, N]) -> [B] floats.
"""

from __future__ import annotations

import numpy as np


def fraction_of_vowels(prompts, responses, tokens, mask) -> np.ndarray:
    """Share of vowels among a response's letters: a smooth toy objective for smoke tests."""
    out = []
    for r in responses:
        letters = [ch for ch in r.lower() if ch.isalpha()]
        out.append(sum(ch in "aeiou" for ch in letters) / max(len(letters), 1))
    return np.asarray(out, np.float32)


def token_frequency(target_id: int):
    """A reward = share of response tokens equal to `target_id` (a learnable, verifiable objective)."""

    def fn(prompts, responses, tokens, mask) -> np.ndarray:
        mask = np.asarray(mask, np.float32)
        return ((np.asarray(tokens) == target_id) * mask).sum(1) / np.maximum(mask.sum(1), 1.0)

    return fn
