"""A checkpoint's own Jinja chat template, rendered as transformers' `apply_chat_template` renders it.

transformers compiles the template in jinja2's ImmutableSandboxedEnvironment (trim_blocks, lstrip_blocks, the
loopcontrols extension and a no-op `{% generation %}` tag), with the globals raise_exception and strftime_now and a
`tojson` filter that does not escape HTML, and renders it with `messages`, `add_generation_prompt`, tools=None,
documents=None and the tokenizer's named special tokens (bos_token, eos_token, ...). `render` does the same, so the
text is the checkpoint's own, byte for byte.

Special-token text the template writes encodes as those tokens. The same text inside a message's content is
marked before rendering (`mark`) and encodes as plain text (`encode`), as transformers' sanitize_control_tokens
does, so content cannot forge a turn.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlhf_jax.errors import ConfigError, MissingFileError

CONFIG_FILE = "tokenizer_config.json"
# Private-use characters around special-token text inside content (the ones transformers uses).
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_MARKED = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.S)


@functools.cache
def source_in(directory: str, choices: tuple[str, ...]) -> str:
    """The chat template of the checkpoint in `directory`: tokenizer_config.json's "chat_template", a string or
    a list of {"name", "template"} (then the one named "default", as transformers picks it without tools)."""
    path = os.path.join(directory, CONFIG_FILE)
    fix = f'add "chat_template" (a Jinja string) there, or set config.data.chat_template to one of {choices}'
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{path} does not exist, and chat_template='checkpoint' reads the checkpoint's template from it; {fix}."
        )
    with open(path) as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise MissingFileError(f'{path}: "chat_template" names {sorted(named)} but no "default"; {fix}.')
        template = named["default"]
    if not isinstance(template, str) or not template:
        raise MissingFileError(f"{path} has no \"chat_template\" for chat_template='checkpoint'; {fix}.")
    return template


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson escapes "<", ">", "&" and "'" for HTML; chat templates want the JSON as is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def compile_template(source: str) -> jinja2.Template:
    """`source` compiled as transformers compiles it; ConfigError when it is not Jinja."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); fix its text or pick another "
            f"config.data.chat_template."
        ) from e


def render(source: str, messages: list[dict], variables: dict[str, str], add_generation_prompt: bool) -> str:
    """The template's text for `messages`; `variables`: bos_token, eos_token, ... (jinja2.TemplateError when the
    template refuses the dialogue, e.g. through raise_exception)."""
    return compile_template(source).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def mark(messages: list[dict[str, str]], special_re: re.Pattern) -> list[dict[str, str]]:
    """Copies of `messages` whose special-token text is wrapped in marks (marks already in the content dropped)."""
    wrap = lambda m: _OPEN + m.group() + _CLOSE
    return [
        {**m, "content": special_re.sub(wrap, m["content"].replace(_OPEN, "").replace(_CLOSE, ""))} for m in messages
    ]


def unmark(text: str) -> str:
    return text.replace(_OPEN, "").replace(_CLOSE, "")


def encode(text: str, tok) -> list[int]:
    """Ids of rendered text: marked special-token text as plain text, the rest as template markup."""
    ids = []
    for i, part in enumerate(_MARKED.split(text)):  # markup, marked, markup, marked, ..., markup
        if part:
            ids += tok.encode(part) if i % 2 else tok.encode_markup(unmark(part))
    return ids


def end_pattern(end_text: str) -> re.Pattern:
    """`end_text` where the template wrote it (not marked content)."""
    return re.compile(f"(?<!{_OPEN}){re.escape(end_text)}")
