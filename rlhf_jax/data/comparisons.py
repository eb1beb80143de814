"""Reward-model data: ranked comparisons → chat-rendered [K, L] records (TFDS, ArrayRecord).

Input formats (JSONL or JSONL.gz, one object a line):
    ranked    {"prompt": str | messages, "responses": [str, ...], "ranking": [int, ...]}
              ranking = indices into responses, best first; a permutation of range(K), K >= 2
    pairwise  {"prompt": str | messages, "chosen": str, "rejected": str}            (K = 2)
    hh_rlhf   Anthropic HH-RLHF {"chosen": dialogue, "rejected": dialogue}, a dialogue being
              "\\n\\nHuman: ...\\n\\nAssistant: ...". Each is split at its final "\\n\\nAssistant:"
              into the shared history (Human → user, Assistant → assistant turns) and the response.
    tldr      OpenAI summarize-from-feedback {"info": {post...}, "summaries": [{"text"}, {"text"}],
              "choice": 0|1} (see tldr.py; the query is shortened by the paper's rule, not step 1 below)

Records, responses REORDERED best first (so a trainer needs no ranking), L = max_len:
    tokens      int32 [K, L]  row k = chat.render_dialogue(prompt + response k, template), right-padded
    input_mask  int32 [K, L]  1 on real tokens
    valid       int32 [K]     1 for a real response; prompts with fewer than K get all-pad rows
    prompt_len  int32 []      tokens of the (shared, truncated) prompt: row k's response starts there

Truncation, the same for every response of a prompt so all K are read in the same context:
1. the prompt (ending with <|assistant|>) loses tokens from the LEFT, right after bos, until it
   fits beside the LONGEST response (and within max_prompt_len), down to [bos, <|assistant|>];
2. a response still too long loses content tokens from the RIGHT but keeps its final <|end|>.
The RM reads its reward at the last real token, so keeping <|end|> there means every response is
scored at the same kind of position (as PPO scores a finished sample) — never mid-sentence.

Defects: malformed records (bad JSON, missing keys, wrong types, a ranking that is not a
permutation, K < 2) are always errors naming path:line. Content defects (an empty response, HH
chosen/rejected histories that differ, an HH history ending with an Assistant turn) are errors
unless skip_invalid, which defaults to True for hh_rlhf and tldr: the public HH-RLHF files hold a
few such pairs (6 of the first 1,800 lines of harmless-base/test), the summarize-from-feedback
validation files CNN/DM articles. Skipped records are logged and counted
in stats["skipped"].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import chat, records, tldr
from rlhf_jax.data.hh_rlhf import HH_ASSISTANT, hh_messages, split_hh_dialogue
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlhf_jax.errors import ConfigError, DataError

FORMATS = ("ranked", "pairwise", "hh_rlhf", "tldr")
VERSION = "1.1.0"  # 1.1: prompt_len


DefectiveRecord = chat.DefectiveRecord


# --- reading -----------------------------------------------------------------------------------


def read_comparisons(
    path: str, fmt: str, line_range: tuple[int, int] | None = None, skip_invalid: bool | None = None
) -> list[dict[str, Any]]:
    """Comparisons in file order: {"prompt_messages": [...], "responses": [str, ...] best first,
    "fit": None or the format's prompt shortener (tldr.prompt), "where": "path:line"}.
    skip_invalid=None: True for hh_rlhf and tldr, else False (module docstring)."""
    return _read(path, fmt, line_range, skip_invalid)[0]


def _read(path, fmt, line_range, skip_invalid, warn: bool = True) -> tuple[list[dict[str, Any]], int]:
    if fmt not in FORMATS:
        raise ConfigError(f"comparison format {fmt!r} is not one of {FORMATS}.")
    return records.read_records(
        path, fmt, line_range, skip_invalid, lambda r, w: parse_record(r, fmt, w), "records", warn
    )


def parse_record(record: Any, fmt: str, where: str) -> dict[str, Any]:
    """{"prompt_messages", "responses" best first, "fit"} of one record; ValueError naming `where`."""
    if fmt == "tldr":
        messages, responses, fit = tldr.parse_comparison(record, where)
        return {"prompt_messages": messages, "responses": responses, "fit": fit}
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__} — write one object per line.")
    keys = {
        "ranked": ("prompt", "responses", "ranking"),
        "pairwise": ("prompt", "chosen", "rejected"),
        "hh_rlhf": ("chosen", "rejected"),
    }[fmt]
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {missing} for format {fmt!r}; a record needs {list(keys)} "
            f"(got {sorted(record)}). Rename the fields or pick the matching format."
        )
    if fmt == "hh_rlhf":
        for k in keys:
            _require_str(record[k], k, where)
        prompt, chosen = split_hh_dialogue(record["chosen"], where, "chosen")
        prompt_r, rejected = split_hh_dialogue(record["rejected"], where, "rejected")
        if prompt != prompt_r:
            raise DefectiveRecord(
                f"{where}: 'chosen' and 'rejected' differ before their final {HH_ASSISTANT!r} (first at character "
                f"{len(os.path.commonprefix([prompt, prompt_r]))}), so they do not answer the same prompt — fix or "
                f"remove the record (skip_invalid=True drops such records)."
            )
        messages, named = hh_messages(prompt, where), {"chosen": chosen, "rejected": rejected}
    elif fmt == "pairwise":
        messages, named = _prompt_messages(record["prompt"], where), {k: record[k] for k in ("chosen", "rejected")}
    else:
        messages = _prompt_messages(record["prompt"], where)
        _check_ranking(record["responses"], record["ranking"], where)
        named = {f"responses[{i}]": r for i, r in enumerate(record["responses"])}
    for name, r in named.items():
        _require_str(r, name, where)
        if not r.strip():
            raise DefectiveRecord(
                f"{where}: {name!r} is an empty response — fill it in or remove the record "
                f"(skip_invalid=True drops such records)."
            )
    responses = list(named.values())
    if fmt == "ranked":
        responses = [responses[i] for i in record["ranking"]]
    return {"prompt_messages": messages, "responses": responses, "fit": None}


def _check_ranking(responses: Any, ranking: Any, where: str) -> None:
    if not isinstance(responses, list) or not isinstance(ranking, list):
        raise DataError(
            f"{where}: 'responses' and 'ranking' must be JSON lists, got "
            f"{type(responses).__name__} and {type(ranking).__name__}."
        )
    K = len(responses)
    if K < 2:
        raise DataError(f"{where}: {K} response(s); a comparison needs K >= 2 — add responses or drop the record.")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ranking) or sorted(ranking) != list(range(K)):
        raise DataError(
            f"{where}: ranking={ranking!r:.80} is not a permutation of 0..{K - 1}; list every index "
            f"into 'responses' exactly once, best first."
        )


def _prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A prompt string becomes one user turn; a message list is taken as is (it must not end
    with an assistant turn, which would be the response)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty — fill it in or remove the record.")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        chat.validate_messages(prompt, where)
        if prompt[-1]["role"] == "assistant":
            raise DataError(
                f"{where}: the prompt's last message is an assistant turn; the responses are that "
                f"turn — drop it from 'prompt'."
            )
        return prompt
    raise DataError(
        f"{where}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}."
    )


def _require_str(value: Any, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {key!r} must be a string, got {type(value).__name__} — quote the text as a JSON string."
        )


# --- rendering -----------------------------------------------------------------------------------


def comparison_example(
    prompt_messages: list[dict[str, str]],
    responses: list[str],
    tok: Tokenizer,
    max_len: int,
    num_responses: int,
    max_prompt_len: int | None = None,
    where: str = "",
    template: chat.ChatTemplate = chat.TAGS,
    fit=None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One record (module docstring) from responses best first, and info {"truncated_prompt" (0/1),
    "truncated_responses", "dropped_responses", "rendered_tokens" (longest row before truncation)}.

    Beyond num_responses, the worst responses are dropped (a top-K ranking is still a ranking).
    fit: the format's own prompt shortener (tldr.prompt), tried before cutting from the left.
    """
    end = template.end_id(tok)
    if max_len < template.min_prompt_len(tok) + 2:
        raise ValueError(
            f"max_len={max_len} cannot hold the {template.name!r} template's bos and assistant prefix "
            f"({template.min_prompt_len(tok)} tokens) and a response; raise config.data.seq_len."
        )
    dropped = max(0, len(responses) - num_responses)
    responses = responses[:num_responses]
    prompt = chat.render_prompt(prompt_messages, tok, where, template)  # ... assistant prefix
    bodies = template.assistant_bodies(responses, tok)
    longest = max(len(b) for b in bodies)
    keep = max(template.min_prompt_len(tok), min(max_len - longest, max_prompt_len or len(prompt)))
    info = {
        "truncated_prompt": int(len(prompt) > keep),
        "truncated_responses": 0,
        "dropped_responses": dropped,
        "rendered_tokens": len(prompt) + longest,
    }
    if len(prompt) > keep and fit is not None:
        shorter = fit(prompt_messages, lambda m: len(chat.render_prompt(m, tok, where, template)) <= keep)
        prompt = chat.render_prompt(shorter, tok, where, template)
    prompt = template.cut_left(prompt, keep, tok)
    room = max_len - len(prompt)
    tokens = np.full((num_responses, max_len), tok.pad_id, np.int32)
    input_mask = np.zeros((num_responses, max_len), np.int32)
    valid = np.zeros(num_responses, np.int32)
    for k, body in enumerate(bodies):
        if len(body) > room:
            body = body[: room - 1] + [end]
            info["truncated_responses"] += 1
        row = prompt + body
        tokens[k, : len(row)], input_mask[k, : len(row)], valid[k] = row, 1, 1
    return {"tokens": tokens, "input_mask": input_mask, "valid": valid, "prompt_len": np.int32(len(prompt))}, info


# --- TFDS builder --------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ComparisonsConfig(tfds.core.BuilderConfig):
    jsonl_path: str = ""
    fmt: str = "ranked"
    tokenizer_path: str = ""
    seq_len: int = 0  # L: tokens per response row
    num_responses: int = 0  # K, resolved
    max_prompt_len: int | None = None
    line_range: tuple[int, int] | None = None
    skip_invalid: bool | None = None
    chat_template: dict | None = None  # chat.ChatTemplate.spec(); None: tags


class Comparisons(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One comparisons file (or a line range of it) → [K, L] records in file order, split "train"."""

    VERSION = tfds.core.Version(VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        rows = tfds.features.Tensor(shape=(c.num_responses, c.seq_len), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "tokens": rows,
                    "input_mask": rows,
                    "valid": tfds.features.Tensor(shape=(c.num_responses,), dtype=np.int32),
                    "prompt_len": tfds.features.Tensor(shape=(), dtype=np.int32),
                }
            ),
            disable_shuffling=True,  # file order, so a line range maps to a contiguous index range
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        tok = load_tokenizer(c.tokenizer_path)
        template = chat.template_from_spec(c.chat_template) if c.chat_template else chat.TAGS
        found, skipped = _read(c.jsonl_path, c.fmt, c.line_range, c.skip_invalid)
        examples = []
        stats = {
            "examples": 0,
            "skipped": skipped,
            "num_responses": c.num_responses,
            "responses": 0,
            "truncated_prompts": 0,
            "truncated_responses": 0,
            "dropped_responses": 0,
            "max_rendered_tokens": 0,
        }
        for r in found:
            ex, info = comparison_example(
                r["prompt_messages"],
                r["responses"],
                tok,
                c.seq_len,
                c.num_responses,
                c.max_prompt_len,
                r["where"],
                template,
                r["fit"],
            )
            examples.append(ex)
            stats["examples"] += 1
            stats["responses"] += int(ex["valid"].sum())
            stats["truncated_prompts"] += info["truncated_prompt"]
            stats["truncated_responses"] += info["truncated_responses"]
            stats["dropped_responses"] += info["dropped_responses"]
            stats["max_rendered_tokens"] = max(stats["max_rendered_tokens"], info["rendered_tokens"])
        self.info.metadata.update(stats)
        return {"train": self._generate_examples(examples)}

    def _generate_examples(self, examples: list[dict[str, np.ndarray]]):
        yield from enumerate(examples)


def build_comparison_dataset(
    path: str,
    fmt: str,
    tokenizer_path: str,
    max_len: int,
    data_dir: str,
    num_responses: int | None = None,
    max_prompt_len: int | None = None,
    line_range: tuple[int, int] | None = None,
    skip_invalid: bool | None = None,
    template: chat.ChatTemplate = chat.TAGS,
) -> tuple[Any, dict[str, int]]:
    """Builds (or reuses, keyed by a hash of the arguments and the files) the comparisons in `path`.

    max_len: tokens per response row (L); num_responses: K, default the largest K in the file
    (range); max_prompt_len: optional cap on prompt tokens; template: the chat template. Returns (source, stats):
    source is a random-access sequence of records; stats counts examples, skipped, responses,
    truncated_prompts (examples), truncated_responses, dropped_responses, max_rendered_tokens
    and gives num_responses (K).
    """
    if not isinstance(max_len, (int, np.integer)) or max_len < 4:
        raise ValueError(
            f"max_len={max_len!r} must be an integer >= 4 (bos, <|assistant|>, one response token, <|end|>)."
        )
    if max_prompt_len is not None and max_prompt_len < 2:
        raise ValueError(f"max_prompt_len={max_prompt_len!r} must be >= 2 (bos and <|assistant|>) or None.")
    template = chat.get_template(template)
    path = records.require_file(path, "comparisons JSONL")
    records.check_line_range(line_range, path)
    if fmt not in FORMATS:
        raise ConfigError(f"comparison format {fmt!r} is not one of {FORMATS}.")
    if num_responses is None:
        found, _ = _read(path, fmt, line_range, skip_invalid, warn=False)  # the build warns
        num_responses = max(len(r["responses"]) for r in found)
    elif num_responses < 2:
        raise ValueError(f"num_responses={num_responses} must be >= 2 (or None: the largest K in the file).")
    params = dict(
        jsonl_path=path,
        fmt=fmt,
        tokenizer_path=os.path.abspath(tokenizer_path),
        seq_len=int(max_len),
        num_responses=int(num_responses),
        max_prompt_len=max_prompt_len,
        line_range=tuple(int(x) for x in line_range) if line_range else None,
        skip_invalid=skip_invalid,
        chat_template=None if template == chat.TAGS else template.spec(),
    )
    builder = Comparisons(
        config=ComparisonsConfig(name=records.config_name(params, VERSION), **params),
        data_dir=data_dir,
        file_format="array_record",
    )
    builder.download_and_prepare()
    stats = {k: int(v) for k, v in builder.info.metadata.items()}
    return builder.as_data_source(split="train"), stats
