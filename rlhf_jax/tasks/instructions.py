"""Instruction kinds of the built-in task, their correct answers, and the train/eval split.

An instruction is one line, "kind: arguments":

    copy: fox rain lamp            -> fox rain lamp
    reverse: fox rain lamp         -> lamp rain fox
    sort: 12 3 7  |  sort: fox apple  -> 3 7 12  |  apple fox   (numbers by value, then words)
    add: 7 5                       -> 12                        (operands 0-9)
    subtract: 8 3                  -> 5                         (operands 0-9, never negative)
    count: fox rain lamp           -> 3
    first: fox rain lamp           -> fox
    last: fox rain lamp            -> lamp
    context: the cat is red. the dog is blue. question: what color is the dog?  -> blue
    context: Anna has 3 books. Ben has 5 books. question: how many books does Ben have?  -> 5

Each instance belongs to one split by a hash of its text (`split_of`), so held-out
evaluation prompts never occur in the corpus, the demonstrations or the training prompts.
"""

from __future__ import annotations

import random
import re
import zlib

from rlhf_jax.data.tokenizer import ROLE_PIECES
from rlhf_jax.tasks.world import COLORS, NAMES, NOUNS, WORDS, pick, rand_int

KINDS = ("copy", "reverse", "sort", "add", "subtract", "count", "first", "last", "context")
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1  # share of all instances (by hash) reserved for evaluation
SYSTEM_PROMPT = "Answer with the result only."
# Arithmetic operands are single digits: 100 operand pairs, which a small model can learn from its
# demonstrations (default preset: SFT exactly right on about a quarter of held-out sums). With operands
# up to 49, SFT was exactly right on 3% of held-out sums and differences, so SFT and PPO tied at a
# score of 0 on most of them and arithmetic measured nothing.
MAX_OPERAND = 9

_COLOR_FACT = re.compile(r"the (\w+) is (\w+)\.")
_COLOR_QUESTION = re.compile(r"what color is the (\w+)\?")
_COUNT_FACT = re.compile(r"(\w+) has (\d+) (\w+)\.")
_COUNT_QUESTION = re.compile(r"how many (\w+) does (\w+) have\?")


def sample_instruction(rng: random.Random, split: str = "train", kinds: tuple[str, ...] = KINDS) -> str:
    """One instruction of a kind drawn uniformly from `kinds`, whose instance lies in `split`.

    Lengths with a 384-piece tokenizer of the built-in corpus: "context" prompts render to
    ~60-85 tokens, the others to <= 35; leave "context" out of `kinds` for very short prompts.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}.")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds={kinds!r}; choose a non-empty subset of {KINDS}.")
    while True:  # rejection keeps the draw a pure function of rng; ~1.1 draws for "train"
        instruction = _draw(rng, tuple(kinds))
        if split_of(instruction) == split:
            return instruction


def split_of(instruction: str) -> str:
    """ "eval" for a fixed EVAL_FRACTION of instances (by CRC32 of the text), else "train"."""
    return "eval" if zlib.crc32(instruction.encode("utf-8")) % 1000 < EVAL_FRACTION * 1000 else "train"


def kind_of(instruction: str) -> str:
    """The instruction's kind ("sort", "context", ...); ValueError for anything else."""
    head = instruction.split(":", 1)[0] if ":" in instruction else instruction.split(" ", 1)[0]
    head = head.strip()
    if head not in KINDS:
        raise ValueError(
            f"unknown built-in instruction kind {head!r} in {instruction!r:.120}; "
            f"write 'kind: arguments' with kind one of {KINDS}."
        )
    return head


def solve_instruction(instruction: str) -> str:
    """The correct response, e.g. "sort: 5 2 9" -> "2 5 9". Also accepts "add 3 4" (no colon)."""
    kind = kind_of(instruction)
    rest = instruction.split(":", 1)[1] if ":" in instruction else instruction.split(" ", 1)[1]
    if kind == "context":
        return _answer_from_context(rest, instruction)
    args = rest.split()
    if not args:
        raise ValueError(f"{instruction!r}: {kind!r} needs at least one argument after the colon.")
    if kind == "copy":
        return " ".join(args)
    if kind == "reverse":
        return " ".join(reversed(args))
    if kind == "sort":
        return " ".join(sorted(args, key=lambda a: (not a.isdigit(), int(a) if a.isdigit() else 0, a)))
    if kind == "count":
        return str(len(args))
    if kind == "first":
        return args[0]
    if kind == "last":
        return args[-1]
    if not all(a.isdigit() for a in args):
        raise ValueError(f"{instruction!r}: {kind!r} takes non-negative integers, e.g. '{kind}: 30 12'.")
    numbers = [int(a) for a in args]
    return str(sum(numbers) if kind == "add" else numbers[0] - sum(numbers[1:]))


# ChatML's user turn (SmolLM2, Qwen) as a prompt decodes with its markers (tokenizer.decode_markup).
CHATML_USER, CHATML_END = "<|im_start|>user\n", "<|im_end|>"
HH_USER, HH_ASSISTANT = "Human:", "\n\nAssistant:"  # the HH template's turns (rlhf_jax/data/chat.py HH)


def parse_instruction(prompt: str) -> str:
    """The instruction in a prompt: the last user turn of a decoded chat prompt such as
    "<|system|>...<|end|><|user|>sort: 3 1<|end|><|assistant|>" or
    "<|im_start|>user\nsort: 3 1<|im_end|>\n<|im_start|>assistant\n" (ChatML) or
    "\n\nHuman: sort: 3 1\n\nAssistant:" (HH) -> "sort: 3 1"; text with no role tags is taken as the
    instruction itself (stripped)."""
    if CHATML_USER in prompt:
        return prompt.rsplit(CHATML_USER, 1)[1].split(CHATML_END, 1)[0].strip()
    if HH_USER in prompt:
        return prompt.rsplit(HH_USER, 1)[1].split(HH_ASSISTANT, 1)[0].strip()
    user, end = ROLE_PIECES["user"], ROLE_PIECES["end"]
    if user not in prompt:
        if any(tag in prompt for tag in (*ROLE_PIECES.values(), "<|im_start|>")):
            raise ValueError(
                f"prompt {prompt!r:.160} has role tags but no {user} turn; the built-in task "
                f"reads the instruction from the last user turn (if the prompt was cut from the "
                f"left, raise data.max_prompt_len)."
            )
        return prompt.strip()
    return prompt.rsplit(user, 1)[1].split(end, 1)[0].strip()


def prompt_messages(instruction: str, system: bool = False) -> list[dict[str, str]]:
    """The chat messages of a prompt: an optional system turn, then the user turn."""
    head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    return head + [{"role": "user", "content": instruction}]


def _draw(rng: random.Random, kinds: tuple[str, ...]) -> str:
    kind = pick(rng, kinds)
    if kind in ("add", "subtract"):
        a, b = rand_int(rng, MAX_OPERAND + 1), rand_int(rng, MAX_OPERAND + 1)
        return f"{kind}: {max(a, b)} {min(a, b)}" if kind == "subtract" else f"{kind}: {a} {b}"
    if kind == "context":
        return _context_question(rng)
    n = 2 + rand_int(rng, 4)
    if kind == "sort" and rng.random() < 0.5:
        return "sort: " + " ".join(str(rand_int(rng, 20)) for _ in range(n))
    return f"{kind}: " + " ".join(pick(rng, WORDS) for _ in range(n))


def _context_question(rng: random.Random) -> str:
    n = 2 + rand_int(rng, 2)
    if rng.random() < 0.5:
        nouns = _distinct(rng, NOUNS, n)
        facts = " ".join(f"the {x} is {pick(rng, COLORS)}." for x in nouns)
        question = f"what color is the {pick(rng, nouns)}?"
    else:
        names, thing = _distinct(rng, NAMES, n), pick(rng, NOUNS) + "s"
        facts = " ".join(f"{p} has {2 + rand_int(rng, 8)} {thing}." for p in names)
        question = f"how many {thing} does {pick(rng, names)} have?"
    return f"context: {facts} question: {question}"


def _distinct(rng: random.Random, items: tuple[str, ...], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = pick(rng, items)
        if x not in out:
            out.append(x)
    return out


def _answer_from_context(rest: str, instruction: str) -> str:
    context, sep, question = rest.partition("question:")
    question = question.strip()
    if not sep:
        raise ValueError(f"{instruction!r:.160}: a context instruction needs 'question:' after the facts.")
    if m := _COLOR_QUESTION.fullmatch(question):
        facts = dict(_COLOR_FACT.findall(context))
        key = m.group(1)
    elif m := _COUNT_QUESTION.fullmatch(question):
        facts = {name: k for name, k, thing in _COUNT_FACT.findall(context) if thing == m.group(1)}
        key = m.group(2)
    else:
        raise ValueError(
            f"{instruction!r:.160}: unsupported question {question!r}; ask "
            f"'what color is the X?' or 'how many Xs does NAME have?'."
        )
    if key not in facts:
        raise ValueError(f"{instruction!r:.160}: the context states nothing about {key!r}; add a fact for it.")
    return facts[key]
