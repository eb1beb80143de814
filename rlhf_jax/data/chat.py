"""The one chat template: role-tagged dialogues as token ids with a loss mask.

    bos  <|system|> system text <|end|>  <|user|> question <|end|>  <|assistant|> answer <|end|> ...

Each message is its role tag, the encoded content, then <|end|>. Only assistant
content and its <|end|> carry loss, so the model learns to answer and to stop.
A prompt for generation ends with a bare <|assistant|> tag.

Records on disk are either {"prompt": str, "response": str} or
{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]};
`record_to_messages` turns both into a message list.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def prompt_response_to_messages(prompt: str, response: str) -> list[dict[str, str]]:
    """A single-turn dialogue: the prompt as the user turn, the response as the assistant turn."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def record_to_messages(record: Any, where: str = "") -> list[dict[str, str]]:
    """Messages of one record in either format; ValueError naming `where` (e.g. "file.jsonl:12")."""
    at = f"{where}: " if where else ""
    if not isinstance(record, dict):
        raise ValueError(f"{at}expected a JSON object, got {type(record).__name__} — write one object per line.")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record[key], str):
                raise ValueError(f"{at}{key!r} must be a string, got {type(record[key]).__name__} — "
                                 f"quote the text as a JSON string.")
        messages = prompt_response_to_messages(record["prompt"], record["response"])
    else:
        raise ValueError(f"{at}expected keys {{'prompt', 'response'}} or {{'messages'}}, got {sorted(record)} — "
                         f"rename the fields to one of these formats.")
    validate_messages(messages, where)
    return messages


def validate_messages(messages: Any, where: str = "") -> None:
    """Checks a message list: non-empty, each {"role": one of ROLES, "content": str}."""
    at = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{at}'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{at}messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise ValueError(f"{at}messages[{i}].role={m['role']!r} is not one of {ROLES}.")
        if not isinstance(m["content"], str):
            raise ValueError(f"{at}messages[{i}].content must be a string, got {type(m['content']).__name__}.")


def render_dialogue(messages: list[dict[str, str]], tok: Tokenizer, where: str = "") -> tuple[list[int], list[int]]:
    """(ids, loss_mask), equal lengths: bos then each message; loss_mask=1 exactly on
    assistant content tokens and their <|end|>."""
    validate_messages(messages, where)
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        content = tok.encode(m["content"])
        learn = int(m["role"] == "assistant")
        ids += [tok.role_ids[m["role"]], *content, tok.role_ids["end"]]
        mask += [0] + [learn] * (len(content) + 1)
    return ids, mask


def render_prompt(messages: list[dict[str, str]], tok: Tokenizer, where: str = "") -> list[int]:
    """Ids of a dialogue prompt, ending with <|assistant|> so the model writes the next turn."""
    validate_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        at = f"{where}: " if where else ""
        raise ValueError(f"{at}a prompt must not end with an assistant turn (that is the response to "
                         f"generate) — drop the last message.")
    ids, _ = render_dialogue(messages, tok, where)
    return ids + [tok.role_ids["assistant"]]
