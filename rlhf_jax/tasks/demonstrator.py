"""A noisy demonstrator: writes the correct answer, except with probability `error_rate`
a corrupted one, as human demonstrations contain slips; and with probability `chatter_rate`
it ends with a chatty remark ("42 is the answer") although the task asks for the result only.

A corruption is one edit that always changes the answer: a word dropped, two different
words swapped, a word replaced (a number by a nearby number, a word by another word), a word
repeated, or (with probability `forbidden_prob`) a FORBIDDEN word inserted.

The two kinds of mistake differ in how hard they are to see. A slip is found only by solving
the instruction, which is as hard as answering it; chatter (and a FORBIDDEN word) is seen
without solving anything. A preference signal can teach the policy to drop what a rater sees
at a glance, which is where RLHF beats imitation of the demonstrations.
"""

from __future__ import annotations

import random

from rlhf_jax.tasks.instructions import solve_instruction
from rlhf_jax.tasks.judge import normalise
from rlhf_jax.tasks.world import COLORS, FORBIDDEN, WORDS, pick, rand_int

DEFAULT_ERROR_RATE = 0.2
DEFAULT_FORBIDDEN_PROB = 0.15  # share of corruptions that insert a FORBIDDEN word
DEFAULT_CHATTER_RATE = 0.0  # share of responses that end with a CHATTER remark
# Remarks a chatty demonstrator puts after the answer, from words of the pretraining corpus. The gold
# judge counts them as extra words (e.g. "42 is the answer" scores 1 - 3/4 = 0.25). After the answer, not
# before it: a policy that drops a trailing remark ends its answer where the demonstrations without one
# end it, while one that drops an opening must start its answer where 1 - chatter_rate of them start
# (measured with openings at rate 0.7, PPO dropped them but wrote a wrong first word far more often).
CHATTER = ("is the answer", "yes it is", "i see it", "here it is")
_CHATTER_WORDS = tuple(remark.split() for remark in CHATTER)


def demonstrate(
    instruction: str,
    rng: random.Random,
    error_rate: float = DEFAULT_ERROR_RATE,
    forbidden_prob: float = DEFAULT_FORBIDDEN_PROB,
    chatter_rate: float = DEFAULT_CHATTER_RATE,
) -> str:
    """The demonstrator's response to `instruction`: correct with probability 1 - error_rate, ending
    with a CHATTER remark with probability chatter_rate (drawn independently)."""
    for name, rate in (("error_rate", error_rate), ("chatter_rate", chatter_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}={rate} must lie in [0, 1] (a probability per response).")
    answer = solve_instruction(instruction)
    response = corrupt(answer, rng, forbidden_prob) if rng.random() < error_rate else answer
    # chatter_rate 0 draws nothing, so a demonstrator without chatter writes what it always wrote
    if chatter_rate > 0 and rng.random() < chatter_rate:
        response = f"{response} {pick(rng, CHATTER)}"
    return response


def without_chatter(response: str) -> str:
    """The response (up to its first role tag, normalised as the judge does) with a trailing CHATTER
    remark cut off, if it has one after at least one word of answer."""
    words = normalise(response)
    for remark in _CHATTER_WORDS:
        if len(words) > len(remark) and words[-len(remark) :] == remark:
            return " ".join(words[: -len(remark)])
    return " ".join(words)


def ends_with_chatter(response: str) -> bool:
    """True when the response ends with a CHATTER remark after its answer (what `demonstrate`
    appends at `chatter_rate`)."""
    return without_chatter(response) != " ".join(normalise(response))


def corrupt(answer: str, rng: random.Random, forbidden_prob: float = DEFAULT_FORBIDDEN_PROB) -> str:
    """`answer` with one edit applied; never equal to `answer` (as words)."""
    words = answer.split()
    if rng.random() < forbidden_prob:
        words.insert(rand_int(rng, len(words) + 1), pick(rng, FORBIDDEN))
        return " ".join(words)
    ops = ["replace", "repeat"]
    if len(words) >= 2:
        ops.append("drop")
    if len(set(words)) >= 2:
        ops.append("swap")
    op, i = pick(rng, tuple(ops)), rand_int(rng, len(words))
    if op == "drop":
        del words[i]
    elif op == "repeat":
        words.insert(i, words[i])
    elif op == "swap":
        j = rand_int(rng, len(words) - 1)
        j += j >= i  # a position other than i ...
        while words[j] == words[i]:  # ... holding a different word, so the swap changes the answer
            j = rand_int(rng, len(words))
        words[i], words[j] = words[j], words[i]
    else:
        words[i] = _other(words[i], rng)
    return " ".join(words)


def _other(word: str, rng: random.Random) -> str:
    """A plausible wrong value for `word`: a nearby number, or another word of the same pool."""
    if word.isdigit():
        delta = 1 + rand_int(rng, 3)
        n = int(word) + (delta if rng.random() < 0.5 or int(word) < delta else -delta)
        return str(n)
    pool = COLORS if word in COLORS else WORDS
    while (other := pick(rng, pool)) == word:
        pass
    return other


# Share of responses with 0, 1, 2, 3 corruptions in `sft_like_responses`.
SFT_LIKE_EDITS = (0.4, 0.3, 0.2, 0.1)


def sft_like_responses(instruction: str, k: int, rng: random.Random) -> list[str]:
    """K responses of mixed quality, as an SFT policy samples them: each is the answer with
    0-3 corruptions in the proportions SFT_LIKE_EDITS. Used to calibrate the labelers."""
    answer, out = solve_instruction(instruction), []
    for _ in range(k):
        u, edits = rng.random(), 0
        while edits < len(SFT_LIKE_EDITS) - 1 and u >= sum(SFT_LIKE_EDITS[: edits + 1]):
            edits += 1
        response = answer
        for _ in range(edits):
            response = corrupt(response, rng)
        out.append(response)
    return out
