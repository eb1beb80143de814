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
    checkpoint  the checkpoint's own Jinja template: "chat_template" of the tokenizer_config.json beside the
            tokenizer (a GGUF's tokenizer.chat_template, which rlhf_jax.hf.gguf writes there), rendered as
            transformers' apply_chat_template renders it (rlhf_jax/data/chat_jinja.py).
    chatml  the same mechanism with a fixed ChatML template, `<|im_start|>role\ntext<|im_end|>\n` per turn, no
            bos: SmolLM2's and Qwen's turns without their default system messages.

Template text's special tokens (<|im_start|>, <|eot_id|>, </s>) encode as those tokens; the same text inside
content stays plain text, so content cannot forge a turn. A Jinja template (checkpoint, chatml) renders the whole
dialogue at once, and an assistant body is the text between the prompt rendered with add_generation_prompt and
the first end token the template writes after it (<|im_end|>, <|eot_id|>: the special token it puts after an
assistant's content, the PPO stop token); the prompt must be the start of the dialogue's rendering, or the
template fails naming the turn. A dialogue that ends with an assistant turn stops at its end token, as a generated
response does (ChatML's "\n" after <|im_end|> belongs to the next turn).

`config.data.chat_system` (any template): a system message put first in dialogues that have none,
as a checkpoint's own template does (SmolLM2's: "You are a helpful AI assistant named SmolLM, ...").

Records on disk are either {"prompt": str, "response": str} or
{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]};
`record_to_messages` turns both into a message list.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jinja2

from rlhf_jax.data import chat_jinja
from rlhf_jax.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
TEMPLATES = ("tags", "hh", "plain", "custom", "chatml", "checkpoint")
# transformers' ChatML template (SmolLM2's without its default system message).
CHATML_SOURCE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The dialogue a Jinja template is probed with for its end token, head and assistant prefix.
_PROBE = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})


class DefectiveRecord(DataError):
    """A well-formed record whose content cannot be trained on (skippable with skip_invalid)."""


class _Template:
    """What every template does alike, given its head and assistant prefix."""

    def spec(self) -> dict[str, Any]:
        """A JSON-able description (builders hash it into their cache key)."""
        return dataclasses.asdict(self)

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


@dataclasses.dataclass(frozen=True)
class ChatTemplate(_Template):
    """A template built from strings (module docstring). tags=True: role ids and <|end|>; else text and eos."""

    name: str
    tags: bool = False
    prefix: tuple[tuple[str, str], ...] = ()  # (role, text) pairs; missing roles: ""
    suffix: tuple[tuple[str, str], ...] = ()
    lead: str = ""  # text before every content (HH's one space after "Human:")
    system: str = ""  # a system message for dialogues without one (config.data.chat_system)

    def _check(self, tok) -> None:
        if self.tags and not all(getattr(tok, "role_ids", {}).get(r) is not None for r in (*ROLES, "end")):
            raise ConfigError(
                f"chat_template='tags' needs a tokenizer with role tokens <|system|>, <|user|>, <|assistant|>, "
                f"<|end|>, and {tok!r} has none. Set --config.data.chat_template=hh (HH-RLHF text turns), plain, "
                f"or custom with --config.data.chat_custom.<role>_prefix=... ."
            )

    def head(self, tok) -> list[int]:
        """Tokens before the first turn; prompt truncation never removes them."""
        if tok.bos_id is None or tok.bos_id < 0:  # some SentencePiece models have none
            return []
        return [tok.bos_id]

    def end_id(self, tok) -> int:
        """The token that ends an assistant body: <|end|> (tags) or eos."""
        self._check(tok)
        return tok.role_ids["end"] if self.tags else tok.eos_id

    def _markup(self, text: str, tok) -> list[int]:
        """Template text (never content): special-token text in it encodes as those tokens."""
        return tok.encode_markup(text) if text else []

    def turn(self, role: str, content: str, tok) -> tuple[list[int], list[int]]:
        """(prefix ids, body ids) of one message."""
        self._check(tok)
        if self.tags:
            return [tok.role_ids[role]], tok.encode(content) + [tok.role_ids["end"]]
        prefix = self._markup(dict(self.prefix).get(role, ""), tok)
        body = tok.encode(self.lead + content) + self._markup(dict(self.suffix).get(role, ""), tok)
        return prefix, body + ([self.end_id(tok)] if role == "assistant" else [])

    def assistant_prefix(self, tok) -> list[int]:
        return self.turn("assistant", "", tok)[0]

    def assistant_bodies(self, responses: list[str], tok) -> list[list[int]]:
        """Body ids of each response as an assistant turn (one batched encode)."""
        self._check(tok)
        if self.tags:
            return [ids + [tok.role_ids["end"]] for ids in tok.encode_many(responses)]
        tail = self._markup(dict(self.suffix).get("assistant", ""), tok) + [self.end_id(tok)]
        return [ids + tail for ids in tok.encode_many([self.lead + r for r in responses])]

    def dialogue(self, messages: list[dict[str, str]], tok, where: str = "") -> tuple[list[int], list[int]]:
        """render_dialogue for this template."""
        ids = self.head(tok)
        mask = [0] * len(ids)
        for m in self.with_system(messages):
            prefix, body = self.turn(m["role"], m["content"], tok)
            ids += prefix + body
            mask += [0] * len(prefix) + [int(m["role"] == "assistant")] * len(body)
        return ids, mask

    def prompt(self, messages: list[dict[str, str]], tok, where: str = "") -> list[int]:
        """render_prompt for this template."""
        return self.dialogue(messages, tok, where)[0] + self.assistant_prefix(tok)


@dataclasses.dataclass(frozen=True)
class JinjaTemplate(_Template):
    """A Jinja chat template (module docstring); source "": the one in the tokenizer's directory."""

    name: str
    source: str = ""
    system: str = ""

    def _source(self, tok) -> str:
        return self.source or chat_jinja.source_in(os.path.dirname(tok.path), TEMPLATES)

    def _render(self, messages, tok, generation: bool, where: str = "", **variables) -> str:
        """The template's text for `messages`, with special-token text inside contents marked."""
        try:
            return chat_jinja.render(
                self._source(tok),
                chat_jinja.mark(messages, tok.special_re),
                tok.named_tokens | variables,
                generation,
            )
        except jinja2.TemplateError as e:
            at = f"{where}: " if where else ""
            raise DefectiveRecord(f"{at}the {self.name!r} chat template refuses this dialogue: {e}") from e

    def text(self, messages: list[dict[str, str]], tok, add_generation_prompt: bool = False) -> str:
        """The rendering transformers' apply_chat_template(messages, tokenize=False) gives."""
        return chat_jinja.unmark(self._render(self.with_system(messages), tok, add_generation_prompt))

    def _split(self, messages, tok, where: str = "") -> tuple[str, int]:
        """(text of `messages`, which end with an assistant turn; where that turn's body starts in it)."""
        prompt = self._render(messages[:-1], tok, True, where)
        text = self._render(messages, tok, False, where)
        if not text.startswith(prompt):
            at = f"{where}: " if where else ""
            n = len(os.path.commonprefix([prompt, text]))
            raise ConfigError(
                f"{at}the {self.name!r} chat template does not render the prompt of message {len(messages) - 1} "
                f"(add_generation_prompt=True) as the start of the dialogue: it writes {prompt[n : n + 40]!r} "
                f"where the dialogue has {text[n : n + 40]!r}, so the assistant's tokens cannot be told apart "
                f"(loss mask, prompt and response). Use a template whose generation prompt opens every "
                f"assistant turn, or another config.data.chat_template ({TEMPLATES})."
            )
        return text, len(prompt)

    def _body_span(self, messages, tok, where: str = "") -> tuple[str, int, int]:
        """(text of `messages`, which end with an assistant turn; start and end of that turn's body in it)."""
        text, start = self._split(messages, tok, where)
        end = chat_jinja.end_pattern(_probe(self, tok).end).search(text, start)
        if end is None:
            raise ConfigError(
                f"{where + ': ' if where else ''}the {self.name!r} chat template writes no "
                f"{_probe(self, tok).end!r} after assistant message {len(messages) - 1}, so its response has no end."
            )
        return text, start, end.end()

    def dialogue(self, messages: list[dict[str, str]], tok, where: str = "") -> tuple[list[int], list[int]]:
        """render_dialogue: the template's ids, cut after the last assistant body when the dialogue ends with one."""
        messages = self.with_system(messages)
        full = self._render(messages, tok, False, where)
        cuts = [0]
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                text, start, end = self._body_span(messages[: k + 1], tok, where)
                if full[:end] != text[:end]:
                    raise ConfigError(
                        f"{where + ': ' if where else ''}the {self.name!r} chat template renders the dialogue up "
                        f"to message {k} differently when later turns follow, so a turn's tokens depend on the "
                        f"future; use another config.data.chat_template ({TEMPLATES})."
                    )
                cuts += [start, end]
        cuts.append(cuts[-1] if messages[-1]["role"] == "assistant" else len(full))
        ids, mask = [], []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            part = chat_jinja.encode(full[a:b], tok)
            ids += part
            mask += [i % 2] * len(part)
        return ids, mask

    def prompt(self, messages: list[dict[str, str]], tok, where: str = "") -> list[int]:
        """render_prompt: the template's ids with add_generation_prompt."""
        return chat_jinja.encode(self._render(self.with_system(messages), tok, True, where), tok)

    def head(self, tok) -> list[int]:
        return list(_probe(self, tok).head)

    def end_id(self, tok) -> int:
        """The special token the template writes after an assistant's content."""
        return tok.special_ids[_probe(self, tok).end]

    def assistant_prefix(self, tok) -> list[int]:
        return list(_probe(self, tok).assistant_prefix)

    def assistant_bodies(self, responses: list[str], tok) -> list[list[int]]:
        """Body ids of each response as the assistant turn after a one-message prompt."""
        out = []
        for r in responses:
            ids, mask = self.dialogue([_PROBE[0], {"role": "assistant", "content": r}], tok)
            out.append([i for i, m in zip(ids, mask) if m])
        return out


@dataclasses.dataclass(frozen=True)
class _Probed:
    end: str  # the special-token text after an assistant's content
    head: tuple[int, ...]  # (bos,) when the template writes bos_token first, else ()
    assistant_prefix: tuple[int, ...]  # what add_generation_prompt adds


@functools.lru_cache(maxsize=64)
def _probe(template: JinjaTemplate, tok) -> _Probed:
    """What a Jinja template writes around turns, read from its rendering of _PROBE."""
    messages = template.with_system(list(_PROBE))
    text, start = template._split(messages, tok)
    end = tok.special_re.search(text[start:].partition(_PROBE[1]["content"])[2])
    if end is None:
        raise ConfigError(
            f"the {template.name!r} chat template writes no special token after an assistant's content "
            f"(it renders a user and an assistant turn as {text!r}), so a response has no end token; "
            f"use another config.data.chat_template ({TEMPLATES})."
        )
    prompt, bare = text[:start], template._render(messages[:-1], tok, False)
    if not prompt.startswith(bare):
        raise ConfigError(
            f"the {template.name!r} chat template's add_generation_prompt=True rendering {prompt!r} does not "
            f"start with its rendering without it {bare!r}; use another config.data.chat_template ({TEMPLATES})."
        )
    bos = tok.named_tokens.get("bos_token", "")
    writes_bos = bool(bos) and prompt == bos + template._render(messages[:-1], tok, True, bos_token="")
    head = tuple(tok.encode_markup(bos)) if writes_bos else ()
    return _Probed(end.group(), head, tuple(chat_jinja.encode(prompt[len(bare) :], tok)))


TAGS = ChatTemplate("tags", tags=True)
HH = ChatTemplate("hh", prefix=(("user", "\n\nHuman:"), ("assistant", "\n\nAssistant:")), lead=" ")
PLAIN = ChatTemplate("plain")
CHATML = JinjaTemplate("chatml", source=CHATML_SOURCE)
CHECKPOINT = JinjaTemplate("checkpoint")


def get_template(name: str = "tags", custom: Any = None, system: str = "") -> ChatTemplate | JinjaTemplate:
    """The template `name`; for "custom", `custom` maps <role>_prefix / <role>_suffix / lead to strings.
    `system`: the system message for dialogues without one ("" for none)."""
    if isinstance(name, _Template):
        return name
    if not isinstance(system, str):
        raise ConfigError(f"config.data.chat_system must be a string, got {system!r:.80}.")
    if system:
        return dataclasses.replace(get_template(name, custom), system=system)
    if name == "custom":
        custom = dict(custom or {})
        allowed = {f"{r}_{k}" for r in ROLES for k in ("prefix", "suffix")} | {"lead"}
        unknown = sorted(set(custom) - allowed)
        if unknown or not all(isinstance(v, str) for v in custom.values()):
            raise ConfigError(
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
    templates = {"tags": TAGS, "hh": HH, "plain": PLAIN, "chatml": CHATML, "checkpoint": CHECKPOINT}
    if name not in templates:
        raise ConfigError(f"config.data.chat_template={name!r} is not a template; use one of {TEMPLATES}.")
    return templates[name]


def template_from_spec(spec: dict[str, Any]) -> ChatTemplate | JinjaTemplate:
    """Inverse of spec() (tuples come back from JSON as lists)."""
    if "source" in spec:
        return JinjaTemplate(**spec)
    prefix, suffix = (tuple(tuple(pair) for pair in spec[k]) for k in ("prefix", "suffix"))
    return ChatTemplate(**{**spec, "prefix": prefix, "suffix": suffix})


def config_template(data_config) -> ChatTemplate | JinjaTemplate:
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
        raise DataError(f"{at}expected a JSON object, got {type(record).__name__} — write one object per line.")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record[key], str):
                raise DataError(
                    f"{at}{key!r} must be a string, got {type(record[key]).__name__} — quote the text as a JSON string."
                )
        messages = prompt_response_to_messages(record["prompt"], record["response"])
    else:
        raise DataError(
            f"{at}expected keys {{'prompt', 'response'}} or {{'messages'}}, got {sorted(record)} — "
            f"rename the fields to one of these formats."
        )
    validate_messages(messages, where)
    return messages


def validate_messages(messages: Any, where: str = "") -> None:
    """Checks a message list: non-empty, each {"role": one of ROLES, "content": str}."""
    at = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{at}'messages' must be a non-empty list of {{'role', 'content'}} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{at}messages[{i}] must be an object with 'role' and 'content', got {m!r:.80}.")
        if m["role"] not in ROLES:
            raise DataError(f"{at}messages[{i}].role={m['role']!r} is not one of {ROLES}.")
        if not isinstance(m["content"], str):
            raise DataError(f"{at}messages[{i}].content must be a string, got {type(m['content']).__name__}.")


def render_dialogue(
    messages: list[dict[str, str]], tok, where: str = "", template: ChatTemplate | JinjaTemplate = TAGS
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask), equal lengths: head then each turn; loss_mask=1 exactly on assistant bodies."""
    validate_messages(messages, where)
    return template.dialogue(messages, tok, where)


def render_prompt(
    messages: list[dict[str, str]], tok, where: str = "", template: ChatTemplate | JinjaTemplate = TAGS
) -> list[int]:
    """Ids of a dialogue prompt, ending with the assistant prefix so the model writes the next turn."""
    validate_messages(messages, where)
    if messages[-1]["role"] == "assistant":
        at = f"{where}: " if where else ""
        raise DataError(
            f"{at}a prompt must not end with an assistant turn (that is the response to "
            f"generate) — drop the last message."
        )
    return template.prompt(messages, tok, where)
