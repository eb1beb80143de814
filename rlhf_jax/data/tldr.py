"""OpenAI's Reddit TL;DR summarization data (Stiennon et al. 2020) as chat messages.

Two local JSONL(.gz) formats, both read with format name "tldr":

    SFT / prompts   {"subreddit", "title", "post", "summary", ...}   the filtered TL;DR set
                    (openai/summarize-from-feedback's reddit tldr_3_filtered, as used by the N+
                    implementation-details paper, Huang et al. 2024)
    comparisons     {"info": {"subreddit", "title", "post", ...}, "summaries": [{"text"}, {"text"}],
                    "choice": 0|1, ...}   openai/summarize-from-feedback comparisons/*.json

The prompt is one user turn, the paper's query

    SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:

and the response " {summary}" (the SFT summaries lack the leading space, the comparison summaries
have it). Render it with chat_template="plain" to reproduce the papers' token stream.

Truncation (summarize-from-feedback tasks.py, kept by the N+ paper's tldr_dataset.py): while the
query is too long, the POST is cut before its last "\\n"; with no newline left, characters are
removed from its end (here: the longest prefix that fits, found by bisection, instead of one
character at a time). The subreddit, title and "TL;DR:" survive unless they alone are too long
(then the builder's generic cut from the left applies). Records from CNN/DM
(info without a "post") are defects: skipped by default, since the public validation files mix them in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rlhf_jax.data.chat import DefectiveRecord
from rlhf_jax.errors import DataError

QUERY_HEAD = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: "
QUERY_TAIL = "\n\nTL;DR:"
Messages = list[dict[str, str]]


def query(info: dict[str, str]) -> str:
    return QUERY_HEAD.format(**info) + info["post"] + QUERY_TAIL


def _post_info(info: Any, where: str, name: str) -> dict[str, str]:
    if not isinstance(info, dict):
        raise DataError(
            f"{where}: {name} must be a JSON object with 'subreddit', 'title', 'post', got {type(info).__name__}."
        )
    if "post" not in info and "article" in info:
        raise DefectiveRecord(
            f"{where}: a CNN/DM article, not a Reddit post — the tldr format reads Reddit posts "
            f"only (skip_invalid=True drops such records)."
        )
    missing = [k for k in ("subreddit", "title", "post") if k not in info]
    if missing:
        raise DataError(
            f"{where}: {name} lacks {missing}; a TL;DR post needs 'subreddit', 'title' and 'post' "
            f"(got {sorted(info)}). Use the TL;DR JSON files or another format."
        )
    for k in ("subreddit", "title", "post"):
        if not isinstance(info[k], str):
            raise DataError(f"{where}: {name}.{k} must be a string, got {type(info[k]).__name__}.")
    if not info["post"].strip():
        raise DefectiveRecord(f"{where}: the post is empty — remove the record (skip_invalid=True drops it).")
    return {k: info[k] for k in ("subreddit", "title", "post")}


def _response(text: Any, where: str, name: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: {name} must be a string, got {type(text).__name__} — quote the text.")
    if not text.strip():
        raise DefectiveRecord(f"{where}: {name} is empty — remove the record (skip_invalid=True drops it).")
    return text if text[:1].isspace() else " " + text


def prompt(info: dict[str, str]) -> tuple[Messages, Callable]:
    """(messages, fit): the query as one user turn, and fit(messages, fits) -> messages shortened by
    the truncation rule (module docstring) until fits(messages) or nothing is left to cut."""
    return [{"role": "user", "content": query(info)}], functools.partial(_fit, info)


def _fit(info: dict[str, str], messages: Messages, fits: Callable[[Messages], bool]) -> Messages:
    def with_post(post: str) -> Messages:
        return [{"role": "user", "content": query({**info, "post": post})}] + messages[1:]

    post = info["post"]
    while not fits(with_post(post)) and "\n" in post:
        post = post[: post.rindex("\n")]
    if fits(with_post(post)):
        return with_post(post)
    lo, hi = 0, len(post)  # the longest prefix that fits (post[:lo] fits, post[:hi] does not)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(with_post(post[:mid])) else (lo, mid)
    return with_post(post[:lo])


def parse_sft(record: Any, where: str) -> tuple[Messages, Callable]:
    """(messages ending with the summary, fit) of one TL;DR SFT record."""
    info = _post_info(record, where, "the record")
    if "summary" not in record:
        raise DataError(f"{where}: a TL;DR SFT record needs 'summary' (got {sorted(record)}).")
    messages, fit = prompt(info)
    return messages + [{"role": "assistant", "content": _response(record["summary"], where, "'summary'")}], fit


def parse_prompt(record: Any, where: str) -> tuple[Messages, Callable]:
    """(prompt messages, fit) of a TL;DR SFT record or a comparison record (its "info")."""
    if isinstance(record, dict) and "info" in record:
        return prompt(_post_info(record["info"], where, "'info'"))
    return prompt(_post_info(record, where, "the record"))


def parse_comparison(record: Any, where: str) -> tuple[Messages, list[str], Callable]:
    """(prompt messages, [chosen, rejected], fit) of one summarize-from-feedback comparison."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__} — write one object per line.")
    missing = [k for k in ("info", "summaries", "choice") if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {missing} for format 'tldr'; a comparison needs 'info', "
            f"'summaries' and 'choice' (got {sorted(record)}). Rename the fields or pick the matching "
            f"format."
        )
    summaries, choice = record["summaries"], record["choice"]
    if (
        not isinstance(summaries, list)
        or len(summaries) != 2
        or not all(isinstance(s, dict) and "text" in s for s in summaries)
    ):
        raise DataError(f"{where}: 'summaries' must be a list of two {{'text': ...}} objects, got {summaries!r:.80}.")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise DataError(f"{where}: 'choice'={choice!r} must be 0 or 1 (the index of the preferred summary).")
    messages, fit = prompt(_post_info(record["info"], where, "'info'"))
    texts = [_response(s["text"], where, f"summaries[{i}].text") for i, s in enumerate(summaries)]
    return messages, [texts[choice], texts[1 - choice]], fit
