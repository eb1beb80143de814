"""Chat format: role-tagged dialogues as token ids with a loss mask, by one configurable template.

A dialogue is a message list [{"role": "system"|"user"|"assistant", "content": str}, ...]. Every
template renders it as

    head  turn(m1)  turn(m2) ...          head = [bos] (nothing when the tokenizer has no bos)
    turn(m) = prefix(role)  body(m)        loss_mask = 1 exactly on the bodies of assistant turns

and a prompt for generation is `head turns... prefix("assistant")`, so the model writes the next
assistant body, which ends with the template's end token (the PPO stop token). Templates
(`config.data.chat_template`):

    tags    (default) bos <|user|> text <|end|> <|assistant|> text <|end|> ...: one role id per
            turn, body = content + <|end|>. Needs a tokenizer with role ids (this project's
            sentencepiece models); the others work with any tokenizer (GPT-2 BPE, LLaMA, ...).
    hh      Anthropic HH-RLHF text: "\\n\\nHuman:" / "\\n\\nAssistant:" prefixes, body = " " + content
            (+ eos for assistant turns), so `\\n\\nHuman: hi\\n\\nAssistant: hello` reads as the
            public files do (the one leading space belongs to the body, as in the data).
    plain   no markers: body = content (+ eos for assistant turns). For single-turn tasks whose
            prompt is already formatted, e.g. TL;DR's "...\\n\\nTL;DR:" and response " summary".
    custom  per-role prefix and suffix strings from `config.data.chat_custom` (suffix inside the
            body, before eos for the assistant).
    chatml  ChatML, as SmolLM2 and Qwen write it: `<|im_start|>role\ntext<|im_end|>\n` per turn, no bos.
            Its markers are the tokenizer's special tokens (encoded as such, never from content);
            every body ends with <|im_end|>, and the "\n" between turns is outside the loss.

`config.data.chat_system` (any template): a system message put first in dialogues that have none,
as a checkpoint's own template does (SmolLM2's: "You are a helpful AI assistant named SmolLM, ...").

Records on disk are either {"prompt": str, "response": str} or
{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]};
`record_to_messages` turns both into a message list.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROLES = ("system", "user", "assistant")
TEMPLATES = ("tags", "hh", "plain", "custom", "chatml")


class DefectiveRecord(ValueError):
    """A well-formed record whose content cannot be trained on (skippable with skip_invalid)."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A template (module docstring). tags=True: role ids and <|end|>; else text prefixes/suffixes and eos."""

    name: str
    tags: bool = False
    prefix: tuple[tuple[str, str], ...] = ()  # (role, text) pairs; missing roles: ""
    suffix: tuple[tuple[str, str], ...] = ()
    lead: str = ""  # text before every content (HH's one space after "Human:")
    end: str = ""  # a special token ending every turn's body (ChatML's <|im_end|>); "": eos, assistant turns only
    sep: str = ""  # text between turns, outside the loss (ChatML's "\n" after <|im_end|>)
    bos: bool = True  # the dialogue starts with the tokenizer's bos, when it has one
    system: str = ""  # a system message for dialogues without one (config.data.chat_system)

    def spec(self) -> dict[str, Any]:
        """A JSON-able description (builders hash it into their cache key)."""
        return dataclasses.asdict(self)

    def _check(self, tok) -> None:
        if self.tags and not all(getattr(tok, "role_ids", {}).get(r) is not None for r in (*ROLES, "end")):
            raise ValueError(
                f"chat_template='tags' needs a tokenizer with role tokens <|system|>, <|user|>, <|assistant|>, "
                f"<|end|>, and {tok!r} has none. Set --config.data.chat_template=hh (HH-RLHF text turns), plain, "
                f"or custom with --config.data.chat_custom.<role>_prefix=... ."
            )

    def head(self, tok) -> list[int]:
        """Tokens before the first turn; prompt truncation never removes them."""
        if not self.bos or tok.bos_id is None or tok.bos_id < 0:  # some SentencePiece models have none
            return []
        return [tok.bos_id]

    def end_id(self, tok) -> int:
        """The token that ends an assistant body: <|end|> (tags), the template's end token, or eos."""
        self._check(tok)
        if self.tags:
            return tok.role_ids["end"]
        return tok.special_id(self.end) if self.end else tok.eos_id

    def _markup(self, text: str, tok) -> list[int]:
        """Template text (never content): special-token text in it encodes as those tokens."""
        return tok.encode_markup(text) if text else []

    def turn(self, role: str, content: str, tok, first: bool = False) -> tuple[list[int], list[int]]:
        """(prefix ids, body ids) of one message; a turn after the first starts with the separator."""
        self._check(tok)
        if self.tags:
            return [tok.role_ids[role]], tok.encode(content) + [tok.role_ids["end"]]
        prefix = self._markup(("" if first else self.sep) + dict(self.prefix).get(role, ""), tok)
        body = tok.encode(self.lead + content) + self._markup(dict(self.suffix).get(role, ""), tok)
        return prefix, body + ([self.end_id(tok)] if self.end or role == "assistant" else [])

    def assistant_prefix(self, tok) -> list[int]:
        return self.turn("assistant", "", tok)[0]

    def assistant_bodies(self, responses: list[str], tok) -> list[list[int]]:
        """Body ids of each response as an assistant turn (one batched encode)."""
        self._check(tok)
        if self.tags:
            return [ids + [tok.role_ids["end"]] for ids in tok.encode_many(responses)]
        tail = self._markup(dict(self.suffix).get("assistant", ""), tok) + [self.end_id(tok)]
        return [ids + tail for ids in tok.encode_many([self.lead + r for r in responses])]

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """`messages` with the template's system message first, when it has one and they have none."""
        if self.system and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system}, *messages]
        return messages

    def min_prompt_len(self, tok) -> int:
        """The shortest a prompt gets: head and the assistant prefix."""
        return len(self.head(tok)) + len(self.assistant_prefix(tok))

    def cut_left(self, ids: list[int], keep: int, tok) -> list[int]:
        """`ids` shortened to `keep` tokens by dropping tokens right after the head (oldest turns first)."""
        if len(ids) <= keep:
            return ids
        h = len(self.head(tok))
        return ids[:h] + ids[len(ids) - keep + h :]


TAGS = ChatTemplate("tags", tags=True)
HH = ChatTemplate("hh", prefix=(("user", "\n\nHuman:"), ("assistant", "\n\nAssistant:")), lead=" ")
PLAIN = ChatTemplate("plain")
CHATML = ChatTemplate(
    "chatml", prefix=tuple((r, f"<|im_start|>{r}\n") for r in ROLES), end="<|im_end|>", sep="\n", bos=False
)


def get_template(name: str = "tags", custom: Any = None, system: str = "") -> ChatTemplate:
    """The template `name`; for "custom", `custom` maps <role>_prefix / <role>_suffix / lead to strings.
    `system`: the system message for dialogues without one ("" for none)."""
    if isinstance(name, ChatTemplate):
        return name
    if not isinstance(system, str):
        raise ValueError(f"config.data.chat_system must be a string, got {system!r:.80}.")
    if system:
        return dataclasses.replace(get_template(name, custom), system=system)
    if name == "custom":
        custom = dict(custom or {})
        allowed = {f"{r}_{k}" for r in ROLES for k in ("prefix", "suffix")} | {"lead"}
        unknown = sorted(set(custom) - allowed)
        if unknown or not all(isinstance(v, str) for v in custom.values()):
            raise ValueError(
                f"config.data.chat_custom: keys must be among {sorted(allowed)} with string values "
                f"(got {custom!r:.200})."
            )
        prefix, suffix = ({r: custom.get(f"{r}_{kind}", "") for r in ROLES} for kind in ("prefix", "suffix"))
        return ChatTemplate(
            "custom",
            prefix=tuple((r, t) for r, t in prefix.items() if t),
            suffix=tuple((r, t) for r, t in suffix.items() if t),
            lead=custom.get("lead", ""),
        )
    templates = {"tags": TAGS, "hh": HH, "plain": PLAIN, "chatml": CHATML}
    if name not in templates:
        raise ValueError(f"config.data.chat_template={name!r} is not a template; use one of {TEMPLATES}.")
    return templates[name]


def template_from_spec(spec: dict[str, Any]) -> ChatTemplate:
    """Inverse of ChatTemplate.spec (tuples come back from JSON as lists)."""
    prefix, suffix = (tuple(tuple(pair) for pair in spec[k]) for k in ("prefix", "suffix"))
    return ChatTemplate(**{**spec, "prefix": prefix, "suffix": suffix})


def config_template(data_config) -> ChatTemplate:
    """The template a stage's `config.data` selects (chat_template, chat_custom)."""
    custom = data_config.get("chat_custom")
    return get_template(
        data_config.get("chat_template", "tags"),
        custom.to_dict() if hasattr(custom, "to_dict") else custom,
        data_config.get("chat_system", ""),
    )


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
                raise ValueError(
                    f"{at}{key!r} must be a string, got {type(record[key]).__name__} — quote the text as a JSON string."
                )
        messages = prompt_response_to_messages(record["prompt"], record["response"])
    else:
        raise ValueError(
            f"{at}expected keys {{'prompt', 'response'}} or {{'messages'}}, got {sorted(record)} — "
            f"rename the fields to one of these formats."
        )
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


def render_dialogue(
    messages: list[dict[str, str]], tok, where: str = "", template: ChatTemplate = TAGS
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask), equal lengths: head then each turn; loss_mask=1 exactly on assistant bodies."""
    validate_messages(messages, where)
    ids = template.head(tok)
    mask = [0] * len(ids)
    for i, m in enumerate(template.with_system(messages)):
        prefix, body = template.turn(m["role"], m["content"], tok, first=i == 0)
        ids += prefix + body
        mask += [0] * len(prefix) + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


def render_prompt(messages: list[dict[str, str]], tok, where: str = "", template: ChatTemplate = TAGS) -> list[int]:
    """Ids of a dialogue prompt, ending with the assistant prefix so the model writes the next turn."""
    validate_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        at = f"{where}: " if where else ""
        raise ValueError(
            f"{at}a prompt must not end with an assistant turn (that is the response to "
            f"generate) — drop the last message."
        )
    ids, _ = render_dialogue(messages, tok, where, template)
    return ids + template.assistant_prefix(tok)
