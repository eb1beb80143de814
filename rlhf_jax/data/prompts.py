"""PPO prompts: chat-rendered, LEFT-padded [P] records (TFDS, ArrayRecord).

Input formats (JSONL or JSONL.gz, one object a line):
    prompt    {"prompt": str} (one user turn) or {"messages": [...]} not ending with an assistant turn
    hh_rlhf   Anthropic HH-RLHF {"chosen": dialogue, ...}: the dialogue before its final
              "\\n\\nAssistant:" (the history both responses answer)
    tldr      a TL;DR post {"subreddit", "title", "post", ...} or a summarize-from-feedback
              comparison {"info": {...}, ...}: the paper's "SUBREDDIT: ... TL;DR:" query (tldr.py),
              shortened by the paper's rule (the post cut at its last newline) instead of from the left

Records, P = max_prompt_len:
    prompt_tokens  int32 [P]  chat.render_prompt(messages, template): bos ... assistant prefix, padded on the LEFT
                              so generation continues right after the last prompt token
    prompt_mask    int32 [P]  1 on real tokens
    index          int32 []   the record's place among the file's prompts: prompt_columns(...)[index] are its
                              other fields (e.g. a ground-truth "answer"), which reward functions receive

A prompt longer than P loses tokens from the LEFT right after bos (bos, the most recent turns and
the final assistant prefix survive). As for comparisons, hh_rlhf records whose history ends with an
Assistant turn (and tldr records from CNN/DM) are skipped by default (skip_invalid), other malformed
records are errors naming path:line.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import chat, records, tldr
from rlhf_jax.data.hh_rlhf import hh_messages, split_hh_dialogue
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError, DataError

FORMATS = ("prompt", "hh_rlhf", "tldr")
TEXT_KEYS = ("prompt", "messages")  # a prompt record's text; its other keys are its columns
VERSION = "1.1.0"  # 1.1: the index feature


def read_prompts(
    path: str, fmt: str, line_range: tuple[int, int] | None = None, skip_invalid: bool | None = None
) -> list[dict[str, Any]]:
    """Prompts in file order: {"messages": [...], "fit": None or the format's shortener, "columns": the record's
    other fields, "where": "path:line"}. skip_invalid=None: True for hh_rlhf and tldr, else False."""
    return _read(path, fmt, line_range, skip_invalid)[0]


def prompt_columns(
    path: str, fmt: str, line_range: tuple[int, int] | None = None, skip_invalid: bool | None = None
) -> list[dict[str, Any]]:
    """Each prompt's fields other than its text ("prompt" / "messages"), in the order of the records' index:
    what a reward function is given beside the prompt and response (TRL passes a dataset's columns the same
    way), e.g. {"answer": "42"} of {"prompt": "What is 6 x 7?", "answer": "42"}."""
    return [r["columns"] for r in read_prompts(path, fmt, line_range, skip_invalid)]


def _read(path, fmt, line_range, skip_invalid) -> tuple[list[dict[str, Any]], int]:
    if fmt not in FORMATS:
        raise ConfigError(f"prompt format {fmt!r} is not one of {FORMATS}.")

    def parse(record, where):
        if fmt == "tldr":
            messages, fit = tldr.parse_prompt(record, where)
        else:
            messages, fit = parse_prompt(record, fmt, where), None
        columns = {k: v for k, v in record.items() if k not in TEXT_KEYS}  # a dict: both parsers check
        return {"messages": messages, "fit": fit, "columns": columns}

    return records.read_records(path, fmt, line_range, skip_invalid, parse, "prompts")


def parse_prompt(record: Any, fmt: str, where: str) -> list[dict[str, str]]:
    """The prompt messages of one record; ValueError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__} — write one object per line.")
    if fmt == "hh_rlhf":
        if not isinstance(record.get("chosen"), str):
            raise DataError(f"{where}: an hh_rlhf record needs a string 'chosen' dialogue (got keys {sorted(record)}).")
        history, _ = split_hh_dialogue(record["chosen"], where, "chosen")
        return hh_messages(history, where)
    if "messages" in record:
        messages = record["messages"]
        chat.validate_messages(messages, where)
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"{where}: the last message is an assistant turn; a prompt ends where the model should "
                f"answer — drop that message."
            )
        return messages
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise DataError(
                f"{where}: 'prompt' must be a string, got {type(record['prompt']).__name__} — quote "
                f"the text as a JSON string."
            )
        if not record["prompt"].strip():
            raise DataError(f"{where}: 'prompt' is empty — fill it in or remove the record.")
        return [{"role": "user", "content": record["prompt"]}]
    raise DataError(
        f"{where}: expected key 'prompt' or 'messages', got {sorted(record)} — rename the field "
        f"(or use fmt='hh_rlhf' for HH-RLHF dialogues)."
    )


def prompt_example(
    messages: list[dict[str, str]],
    tok: Tokenizer,
    max_prompt_len: int,
    where: str = "",
    template: chat.ChatTemplate = chat.TAGS,
    fit=None,
) -> tuple[dict[str, np.ndarray], int]:
    """One left-padded record (module docstring) and the rendered length before truncation.
    fit: the format's own shortener (tldr.prompt), tried before cutting from the left."""
    if max_prompt_len < template.min_prompt_len(tok):
        raise ValueError(
            f"max_prompt_len={max_prompt_len} cannot hold the {template.name!r} template's bos and "
            f"assistant prefix ({template.min_prompt_len(tok)} tokens); raise config.data.max_prompt_len."
        )
    ids = chat.render_prompt(messages, tok, where, template)
    n = len(ids)
    if n > max_prompt_len and fit is not None:
        shorter = fit(messages, lambda m: len(chat.render_prompt(m, tok, where, template)) <= max_prompt_len)
        ids = chat.render_prompt(shorter, tok, where, template)
    ids = template.cut_left(ids, max_prompt_len, tok)
    pad = max_prompt_len - len(ids)
    return {
        "prompt_tokens": np.asarray([tok.pad_id] * pad + ids, np.int32),
        "prompt_mask": np.asarray([0] * pad + [1] * len(ids), np.int32),
    }, n


@dataclasses.dataclass(eq=False)
class PromptsConfig(tfds.core.BuilderConfig):
    jsonl_path: str = ""
    fmt: str = "prompt"
    tokenizer_path: str = ""
    seq_len: int = 0  # P: max_prompt_len
    line_range: tuple[int, int] | None = None
    skip_invalid: bool | None = None
    chat_template: dict | None = None  # chat.ChatTemplate.spec(); None: tags


class Prompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One prompts file (or a line range of it) → left-padded [P] records in file order, split "train"."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        row = tfds.features.Tensor(shape=(self.builder_config.seq_len,), dtype=np.int32)
        index = tfds.features.Tensor(shape=(), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict({"prompt_tokens": row, "prompt_mask": row, "index": index}),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        tok = load_tokenizer(c.tokenizer_path)
        template = chat.template_from_spec(c.chat_template) if c.chat_template else chat.TAGS
        records, skipped = _read(c.jsonl_path, c.fmt, c.line_range, c.skip_invalid)
        examples, stats = [], {"examples": 0, "skipped": skipped, "truncated": 0, "max_rendered_tokens": 0}
        for i, r in enumerate(records):
            ex, n = prompt_example(r["messages"], tok, c.seq_len, r["where"], template, r["fit"])
            examples.append({**ex, "index": np.int32(i)})
            stats["examples"] += 1
            stats["truncated"] += int(n > c.seq_len)
            stats["max_rendered_tokens"] = max(stats["max_rendered_tokens"], n)
        self.info.metadata.update(stats)
        return {"train": self._generate_examples(examples)}

    def _generate_examples(self, examples: list[dict[str, np.ndarray]]):
        yield from enumerate(examples)


def build_prompt_dataset(
    path: str,
    fmt: str,
    tokenizer_path: str,
    max_prompt_len: int,
    data_dir: str,
    line_range: tuple[int, int] | None = None,
    skip_invalid: bool | None = None,
    template: chat.ChatTemplate = chat.TAGS,
) -> tuple[Any, dict[str, int]]:
    """Builds (or reuses, keyed by a hash of the arguments and the files) the prompts in `path`,
    rendered with the chat template `template`.

    Returns (source, stats): source is a random-access sequence of records; stats counts
    examples, skipped, truncated and gives max_rendered_tokens (longest prompt before truncation).
    """
    if not isinstance(max_prompt_len, (int, np.integer)) or max_prompt_len < 2:
        raise ValueError(f"max_prompt_len={max_prompt_len!r} must be an integer >= 2 (bos and <|assistant|>).")
    path = records.require_file(path, "prompts JSONL")
    records.check_line_range(line_range, path)
    if fmt not in FORMATS:
        raise ConfigError(f"prompt format {fmt!r} is not one of {FORMATS}.")
    template = chat.get_template(template)
    params = dict(
        jsonl_path=path,
        fmt=fmt,
        tokenizer_path=os.path.abspath(tokenizer_path),
        seq_len=int(max_prompt_len),
        line_range=tuple(int(x) for x in line_range) if line_range else None,
        skip_invalid=skip_invalid,
        chat_template=None if template == chat.TAGS else template.spec(),
    )
    builder = Prompts(
        config=PromptsConfig(name=records.config_name(params, VERSION), **params),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    stats = {k: int(v) for k, v in builder.info.metadata.items()}
    return builder.as_data_source(split="train"), stats
