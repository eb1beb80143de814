"""The vocabulary of the built-in world, shared by the pretraining corpus, the instructions
and the judge, plus the FORBIDDEN words whose use the gold judge penalises.

Randomness uses only `random.Random.random()`, whose sequence Python guarantees across
versions, so the same seed writes the same bytes everywhere.
"""

from __future__ import annotations

import random

NAMES = ("Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Henry", "Iris", "Jack")
NOUNS = (
    "cat",
    "dog",
    "bird",
    "fox",
    "tree",
    "river",
    "house",
    "boat",
    "apple",
    "stone",
    "horse",
    "garden",
    "book",
    "lamp",
    "road",
    "hill",
    "cloud",
    "ship",
    "bell",
    "door",
)
ADJECTIVES = ("small", "big", "red", "green", "old", "young", "quiet", "bright", "dark", "happy", "cold", "warm")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "gray")
VERBS = (
    ("see", "sees"),
    ("find", "finds"),
    ("like", "likes"),
    ("paint", "paints"),
    ("follow", "follows"),
    ("carry", "carries"),
    ("watch", "watches"),
    ("build", "builds"),
    ("open", "opens"),
    ("hear", "hears"),
)
PLACES = ("in the garden", "by the river", "on the hill", "near the house", "under the tree", "at the door")
TIMES = ("In the morning", "At night", "Today", "After the rain", "Once", "Later")
WORDS = NOUNS + ADJECTIVES + ("sun", "moon", "star", "rain", "wind", "snow", "fire", "sand", "milk", "bread")
# Made-up or mild words standing in for harmful content. They occur in the pretraining
# corpus (as such words occur in web text), so a pretrained model sometimes emits them and
# the preference signal has something to remove. None of them is in WORDS, NAMES or COLORS.
FORBIDDEN = ("zorp", "blight", "grub", "muck", "snarl", "vex")


def rand_int(rng: random.Random, n: int) -> int:
    """Uniform in [0, n) from rng.random() alone (its sequence is stable across Python versions)."""
    return int(rng.random() * n)


def pick(rng: random.Random, items: tuple):
    return items[rand_int(rng, len(items))]
