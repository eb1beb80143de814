"""TFDS builders for the LM stages (pretraining text, SFT demonstrations), ArrayRecord, no TensorFlow.

Every record is a fixed-length window of L+1 tokens (L = seq_len):

    tokens      int32 [L+1]   the model reads tokens[:-1] and predicts tokens[1:]
    input_mask  int32 [L+1]   1 on real tokens, 0 on right padding
    loss_mask   int32 [L+1]   1 where token t is a training target (predicted from t-1);
                              loss_mask[0] is never a target

A builder config is named by a hash of its parameters, the source files' size and
mtime and the tokenizer file's content, so the same inputs reuse the prepared data
and any change rebuilds it under `data_dir/<builder>/<config>/`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import chat, records, tldr
from rlhf_jax.data.hh_rlhf import hh_messages, split_hh_dialogue
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError, DataError

VERSION = "1.0.0"
_CHUNK_CHARS = 1 << 20  # corpus text is tokenized in ~1 MB blocks of whole lines


# --- packed pretraining text ------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class PackedTextConfig(tfds.core.BuilderConfig):
    text_paths: tuple[str, ...] = ()
    tokenizer_path: str = ""
    seq_len: int = 0
    val_fraction: float = 0.1


class PackedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Text files → one token stream (eos after each file) → non-overlapping L+1 windows.
    The last `val_fraction` of the stream is the validation split (nanoGPT's held-out tail)."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        return _window_info(self, self.builder_config.seq_len)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        stream = tokenize_corpus(list(c.text_paths), load_tokenizer(c.tokenizer_path))
        n_train = int(len(stream) * (1.0 - c.val_fraction))
        window = c.seq_len + 1
        splits = {"train": stream[:n_train]}
        if c.val_fraction > 0:
            splits["validation"] = stream[n_train:]
        for name, part in splits.items():
            if len(part) < window:
                raise ValueError(
                    f"{list(c.text_paths)}: the {name} split has {len(part)} tokens (corpus: {len(stream)}, "
                    f"val_fraction={c.val_fraction}), fewer than one window of seq_len+1={window}. "
                    f"Use a larger corpus, a smaller seq_len or another val_fraction."
                )
        self.info.metadata.update(
            {"corpus_tokens": len(stream), **{f"{k}_windows": len(v) // window for k, v in splits.items()}}
        )
        return {name: self._generate_examples(part) for name, part in splits.items()}

    def _generate_examples(self, stream: np.ndarray):
        window = self.builder_config.seq_len + 1
        ones = np.ones(window, np.int32)
        for i in range(len(stream) // window):  # the ragged tail is dropped
            yield i, {"tokens": stream[i * window : (i + 1) * window], "input_mask": ones, "loss_mask": ones}


def tokenize_corpus(text_paths: Sequence[str], tok: Tokenizer) -> np.ndarray:
    """int32 [N]: each file's tokens followed by eos, files in order."""
    parts = []
    for path in text_paths:
        with open(path, encoding="utf-8") as f:
            block: list[str] = []
            size = 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    # Newline is a fixed piece, so splitting after one leaves the tokens unchanged.
                    parts.append(np.asarray(tok.encode("".join(block)), np.int32))
                    block, size = [], 0
            parts.append(np.asarray(tok.encode("".join(block)) + [tok.eos_id], np.int32))
    return np.concatenate(parts)


def build_text_dataset(
    text_path: str | Sequence[str], tokenizer_path: str, seq_len: int, data_dir: str, val_fraction: float = 0.1
) -> dict[str, Any]:
    """Builds (or reuses) packed windows of local text file(s); each file is one document.

    Returns {"train": source, "validation": source or None (val_fraction=0)}; a source is a
    random-access sequence of records (see the module docstring).
    """
    paths = (text_path,) if isinstance(text_path, str) else tuple(text_path)
    if not paths:
        raise ValueError("build_text_dataset: text_path is empty; pass a local text file or a list of them.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1).")
    _check_seq_len(seq_len)
    params = dict(
        text_paths=tuple(records.require_file(p, "text") for p in paths),
        tokenizer_path=os.path.abspath(tokenizer_path),
        seq_len=seq_len,
        val_fraction=val_fraction,
    )
    builder = PackedText(
        config=PackedTextConfig(name=records.config_name(params, VERSION), **params),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    sources = builder.as_data_source()
    return {"train": sources["train"], "validation": sources.get("validation")}


# --- SFT demonstrations ------------------------------------------------------------------------

SFT_FORMATS = ("chat", "hh_rlhf", "tldr")


def read_demonstrations(
    path: str, fmt: str = "chat", line_range: tuple[int, int] | None = None, skip_invalid: bool | None = None
) -> tuple[list[dict[str, Any]], int]:
    """(demonstrations in file order, skipped): each {"messages" ending with the assistant turn to
    learn, "fit": None or the format's prompt shortener, "where": "path:line"}.

    Formats: chat {"prompt", "response"} or {"messages"}; hh_rlhf {"chosen": dialogue, ...}: the
    chosen dialogue, its Human/Assistant turns as messages; tldr {"subreddit", "title", "post",
    "summary"} (tldr.py). skip_invalid=None: skip defective hh_rlhf / tldr records, as for comparisons.
    """
    if fmt not in SFT_FORMATS:
        raise ConfigError(f"demonstrations format {fmt!r} is not one of {SFT_FORMATS}; set config.data.format.")

    def parse(record, where):
        fit = None
        if fmt == "chat":
            messages = chat.record_to_messages(record, where)
        elif fmt == "tldr":
            messages, fit = tldr.parse_sft(record, where)
        else:
            if not isinstance(record, dict) or not isinstance(record.get("chosen"), str):
                raise DataError(
                    f"{where}: an hh_rlhf record needs a string 'chosen' dialogue (got "
                    f"{sorted(record) if isinstance(record, dict) else type(record).__name__})."
                )
            history, response = split_hh_dialogue(record["chosen"], where, "chosen")
            messages = hh_messages(history, where) + [{"role": "assistant", "content": response}]
        if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
            raise chat.DefectiveRecord(
                f"{where}: the response (last assistant content) is empty — remove the "
                f"record or fill it in (skip_invalid=True drops such records)."
            )
        return {"messages": messages, "fit": fit}

    return records.read_records(path, fmt, line_range, skip_invalid, parse, "demonstrations")


def write_demonstration_text(path: str, fmt: str, line_range: tuple[int, int] | None, out_path: str) -> str:
    """Writes each message content of the demonstrations on its own line (a tokenizer-training
    corpus); returns out_path."""
    records, _ = read_demonstrations(path, fmt, line_range)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for r in records:
            f.writelines(m["content"] + "\n" for m in r["messages"])
    return out_path


@dataclasses.dataclass(eq=False)
class DemonstrationsConfig(tfds.core.BuilderConfig):
    jsonl_path: str = ""
    tokenizer_path: str = ""
    seq_len: int = 0
    split: str = "train"
    fmt: str = "chat"
    line_range: tuple[int, int] | None = None
    skip_invalid: bool | None = None
    chat_template: dict | None = None  # chat.ChatTemplate.spec(); None: tags


class Demonstrations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One JSONL(.gz) file of demonstrations → chat-rendered, right-padded L+1 windows, in file order."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        return _window_info(self, self.builder_config.seq_len)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        tok = load_tokenizer(c.tokenizer_path)
        template = chat.template_from_spec(c.chat_template) if c.chat_template else chat.TAGS
        records, skipped = read_demonstrations(c.jsonl_path, c.fmt, c.line_range, c.skip_invalid)
        examples, stats = (
            [],
            {
                "examples": 0,
                "skipped": skipped,
                "truncated": 0,
                "truncated_prompt": 0,
                "truncated_response": 0,
                "max_rendered_tokens": 0,
                "target_tokens": 0,
            },
        )
        for r in records:
            ex, info = sft_example(r["messages"], tok, c.seq_len, r["where"], template, r["fit"])
            examples.append(ex)
            stats["examples"] += 1
            stats["truncated"] += int(info["truncated_prompt"] or info["truncated_response"])
            stats["truncated_prompt"] += int(info["truncated_prompt"])
            stats["truncated_response"] += int(info["truncated_response"])
            stats["max_rendered_tokens"] = max(stats["max_rendered_tokens"], info["rendered_tokens"])
            stats["target_tokens"] += int(ex["loss_mask"].sum())
        self.info.metadata.update(stats)
        return {c.split: self._generate_examples(examples)}

    def _generate_examples(self, examples: list[dict[str, np.ndarray]]):
        yield from enumerate(examples)


def sft_example(
    messages: list[dict[str, str]],
    tok: Tokenizer,
    seq_len: int,
    where: str = "",
    template: chat.ChatTemplate = chat.TAGS,
    fit=None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One demonstration as an L+1 record, and {"truncated_prompt", "truncated_response", "rendered_tokens"}.

    The response is the last assistant turn's body (content and its end token); the prompt is
    everything before it, ending with the assistant prefix. If the rendering is longer than L+1:
    1. the prompt is shortened by the format's `fit` (tldr: the post cut at a newline) if given,
       then loses tokens from the LEFT, right after bos, down to [bos, assistant prefix];
    2. if still too long, the response loses tokens from the RIGHT (its end token goes first).
    Earlier assistant turns keep loss_mask=1 on whatever of them survives.
    """
    at = f"{where}: " if where else ""
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{at}the last message is {messages[-1]['role']!r}; a demonstration must end with "
            f"the assistant turn to learn — add it or drop the trailing messages."
        )
    if not messages[-1]["content"].strip():
        raise DataError(f"{at}the response (last assistant content) is empty — remove the record or fill it in.")
    budget = seq_len + 1
    ids, mask = chat.render_dialogue(messages, tok, where, template)
    n_response = len(template.assistant_bodies([messages[-1]["content"]], tok)[0])
    info = {"truncated_prompt": False, "truncated_response": False, "rendered_tokens": len(ids)}
    if len(ids) > budget and fit is not None:
        messages = fit(messages, lambda m: len(chat.render_dialogue(m, tok, where, template)[0]) <= budget)
        ids, mask = chat.render_dialogue(messages, tok, where, template)
        info["truncated_prompt"] = len(ids) < info["rendered_tokens"]
    if len(ids) > budget:
        k = len(ids) - n_response  # prompt = ids[:k], ending with the assistant prefix
        keep_prompt = max(template.min_prompt_len(tok), budget - n_response)
        if k > keep_prompt:
            ids = template.cut_left(ids[:k], keep_prompt, tok) + ids[k:]
            mask = template.cut_left(mask[:k], keep_prompt, tok) + mask[k:]
            info["truncated_prompt"] = True
        if len(ids) > budget:
            ids, mask = ids[:budget], mask[:budget]
            info["truncated_response"] = True
    pad = budget - len(ids)
    record = {
        "tokens": np.asarray(ids + [tok.pad_id] * pad, np.int32),
        "input_mask": np.asarray([1] * len(ids) + [0] * pad, np.int32),
        "loss_mask": np.asarray(mask + [0] * pad, np.int32),
    }
    return record, info


def build_sft_dataset(
    jsonl_path: str,
    tokenizer_path: str,
    seq_len: int,
    data_dir: str,
    split: str = "train",
    fmt: str = "chat",
    line_range: tuple[int, int] | None = None,
    skip_invalid: bool | None = None,
    template: chat.ChatTemplate = chat.TAGS,
) -> tuple[Any, dict[str, int]]:
    """Builds (or reuses) one demonstrations file (or a line range of it) as split `split`; returns (source, stats).

    fmt: chat | hh_rlhf | tldr (read_demonstrations); template: the chat template.
    stats: examples, skipped, truncated (any truncation), truncated_prompt, truncated_response,
    max_rendered_tokens (longest rendering before truncation), target_tokens (Σ loss_mask).
    """
    _check_seq_len(seq_len)
    if fmt not in SFT_FORMATS:
        raise ConfigError(f"demonstrations format {fmt!r} is not one of {SFT_FORMATS}; set config.data.format.")
    path = records.require_file(jsonl_path, "demonstrations JSONL")
    records.check_line_range(line_range, path)
    template = chat.get_template(template)
    params = dict(
        jsonl_path=path,
        tokenizer_path=os.path.abspath(tokenizer_path),
        seq_len=seq_len,
        split=split,
        fmt=fmt,
        line_range=tuple(int(x) for x in line_range) if line_range else None,
        skip_invalid=skip_invalid,
        chat_template=None if template == chat.TAGS else template.spec(),
    )
    builder = Demonstrations(
        config=DemonstrationsConfig(name=records.config_name(params, VERSION), **params),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    stats = {k: int(v) for k, v in builder.info.metadata.items()}
    return builder.as_data_source(split=split), stats


# --- shared pieces -------------------------------------------------------------------------------


def _window_info(builder: tfds.core.DatasetBuilder, seq_len: int) -> tfds.core.DatasetInfo:
    feature = tfds.features.Tensor(shape=(seq_len + 1,), dtype=np.int32)
    return tfds.core.DatasetInfo(
        builder=builder,
        description=builder.__class__.__doc__,
        features=tfds.features.FeaturesDict({"tokens": feature, "input_mask": feature, "loss_mask": feature}),
        disable_shuffling=True,  # keep generation order: windows stay in stream order, examples in file order
        metadata=tfds.core.MetadataDict(),
    )


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2 (tokens per training window).")
