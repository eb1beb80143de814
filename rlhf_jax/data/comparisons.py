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
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import chat, lm_datasets, tldr
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer

FORMATS = ("ranked", "pairwise", "hh_rlhf", "tldr")
SKIP_BY_DEFAULT = ("hh_rlhf", "tldr")  # public files holding a few unusable records
VERSION = "1.0.0"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_log = logging.getLogger(__name__)


DefectiveRecord = chat.DefectiveRecord


# --- reading -----------------------------------------------------------------------------------

def read_jsonl_range(path: str, line_range: tuple[int, int] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) per non-blank line of a .jsonl(.gz) file, where = "path:line" (1-based).

    line_range=(start, stop): only lines start <= i < stop, counted from 0 over all lines (blank
    ones too), e.g. (0, 1500) and (1500, 1800) split a file into train and eval.
    """
    lm_datasets._require_file(path, "JSONL")
    start, stop = check_line_range(line_range, path)
    opener = gzip.open if path.endswith(".gz") else open
    n = 0
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n - 1 < start:
                continue
            if n - 1 >= stop:
                return
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}) — re-save the file as "
                                 f"UTF-8.") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}) — each line must be one "
                                 f"complete JSON object.") from None
    if line_range is not None and stop > n:
        raise ValueError(f"{path}: line_range={tuple(line_range)} reaches line {stop} but the file has {n} "
                         f"lines; use a stop <= {n}.")


def check_line_range(line_range: Any, path: str) -> tuple[int, float]:
    """(start, stop) of a valid line_range (None: the whole file); ValueError otherwise."""
    if line_range is None:
        return 0, float("inf")
    ok = (isinstance(line_range, (tuple, list)) and len(line_range) == 2
          and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in line_range))
    if not ok or not 0 <= line_range[0] < line_range[1]:
        raise ValueError(f"{path}: line_range={line_range!r} must be (start, stop) with 0 <= start < stop, "
                         f"counting lines from 0, e.g. (0, 1500).")
    return int(line_range[0]), int(line_range[1])


def read_comparisons(path: str, fmt: str, line_range: tuple[int, int] | None = None,
                     skip_invalid: bool | None = None) -> list[dict[str, Any]]:
    """Comparisons in file order: {"prompt_messages": [...], "responses": [str, ...] best first,
    "fit": None or the format's prompt shortener (tldr.prompt), "where": "path:line"}.
    skip_invalid=None: True for hh_rlhf and tldr, else False (module docstring)."""
    return _read(path, fmt, line_range, skip_invalid)[0]


def _read(path, fmt, line_range, skip_invalid, warn: bool = True) -> tuple[list[dict[str, Any]], int]:
    if fmt not in FORMATS:
        raise ValueError(f"comparison format {fmt!r} is not one of {FORMATS}.")
    return read_records(path, fmt, line_range, skip_invalid, lambda r, w: parse_record(r, fmt, w), "records", warn)


def read_records(path: str, fmt: str, line_range, skip_invalid: bool | None, parse, what: str,
                 warn: bool = True) -> tuple[list[dict[str, Any]], int]:
    """[{**parse(record, where), "where": where}] for the file's records, and how many were skipped.

    The one reading loop of comparisons, prompts and demonstrations: a DefectiveRecord is skipped
    (and counted) when skip_invalid, which None makes True for the public formats (SKIP_BY_DEFAULT);
    any other ValueError names path:line and stops the build.
    """
    skip = fmt in SKIP_BY_DEFAULT if skip_invalid is None else skip_invalid
    out, skipped = [], 0
    for where, record in read_jsonl_range(path, line_range):
        try:
            out.append({**parse(record, where), "where": where})
        except DefectiveRecord as e:
            if not skip:
                raise
            skipped += 1
            if warn:
                _log.warning("skipped %s", e)
    if not out:
        raise ValueError(f"{path}: no usable {fmt} {what}" + (f" in lines {tuple(line_range)}" if line_range else "")
                         + (f" ({skipped} skipped as defective)" if skipped else "")
                         + "; write one JSON object per line.")
    return out, skipped


def parse_record(record: Any, fmt: str, where: str) -> dict[str, Any]:
    """{"prompt_messages", "responses" best first, "fit"} of one record; ValueError naming `where`."""
    if fmt == "tldr":
        messages, responses, fit = tldr.parse_comparison(record, where)
        return {"prompt_messages": messages, "responses": responses, "fit": fit}
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__} — write one object per line.")
    keys = {"ranked": ("prompt", "responses", "ranking"), "pairwise": ("prompt", "chosen", "rejected"),
            "hh_rlhf": ("chosen", "rejected")}[fmt]
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing} for format {fmt!r}; a record needs {list(keys)} "
                         f"(got {sorted(record)}). Rename the fields or pick the matching format.")
    if fmt == "hh_rlhf":
        for k in keys:
            _require_str(record[k], k, where)
        prompt, chosen = split_hh_dialogue(record["chosen"], where, "chosen")
        prompt_r, rejected = split_hh_dialogue(record["rejected"], where, "rejected")
        if prompt != prompt_r:
            raise DefectiveRecord(
                f"{where}: 'chosen' and 'rejected' differ before their final {HH_ASSISTANT!r} (first at character "
                f"{len(os.path.commonprefix([prompt, prompt_r]))}), so they do not answer the same prompt — fix or "
                f"remove the record (skip_invalid=True drops such records).")
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
            raise DefectiveRecord(f"{where}: {name!r} is an empty response — fill it in or remove the record "
                                  f"(skip_invalid=True drops such records).")
    responses = list(named.values())
    if fmt == "ranked":
        responses = [responses[i] for i in record["ranking"]]
    return {"prompt_messages": messages, "responses": responses, "fit": None}


def _check_ranking(responses: Any, ranking: Any, where: str) -> None:
    if not isinstance(responses, list) or not isinstance(ranking, list):
        raise ValueError(f"{where}: 'responses' and 'ranking' must be JSON lists, got "
                         f"{type(responses).__name__} and {type(ranking).__name__}.")
    K = len(responses)
    if K < 2:
        raise ValueError(f"{where}: {K} response(s); a comparison needs K >= 2 — add responses or drop the record.")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ranking) or sorted(ranking) != list(range(K)):
        raise ValueError(f"{where}: ranking={ranking!r:.80} is not a permutation of 0..{K - 1}; list every index "
                         f"into 'responses' exactly once, best first.")


def _prompt_messages(prompt: Any, where: str) -> list[dict[str, str]]:
    """A prompt string becomes one user turn; a message list is taken as is (it must not end
    with an assistant turn, which would be the response)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: 'prompt' is empty — fill it in or remove the record.")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        chat.validate_messages(prompt, where)
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the prompt's last message is an assistant turn; the responses are that "
                             f"turn — drop it from 'prompt'.")
        return prompt
    raise ValueError(f"{where}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got "
                     f"{type(prompt).__name__}.")


def _require_str(value: Any, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__} — quote the text as a "
                         f"JSON string.")


def split_hh_dialogue(dialogue: str, where: str = "", name: str = "dialogue") -> tuple[str, str]:
    """(history, response): the text before the final "\\n\\nAssistant:" and after it, the
    response without its one leading space."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"{where}: {name!r} has no {HH_ASSISTANT!r} turn; an HH-RLHF dialogue is "
                         f"'\\n\\nHuman: ...\\n\\nAssistant: ...'. Check the format (ranked, pairwise, hh_rlhf).")
    response = dialogue[cut + len(HH_ASSISTANT):]
    return dialogue[:cut], response[1:] if response.startswith(" ") else response


def hh_messages(history: str, where: str = "") -> list[dict[str, str]]:
    """Chat messages of an HH-RLHF history "\\n\\nHuman: a\\n\\nAssistant: b..." (one leading
    space of each turn dropped); it must start with a Human turn and end with one."""
    parts = _HH_TURN.split(history)  # ["", role, text, role, text, ...]
    if parts[0] or len(parts) < 3:
        raise ValueError(f"{where}: the dialogue does not start with '\\n\\nHuman:' (starts {history[:40]!r}); "
                         f"use HH-RLHF dialogues or another format.")
    messages = [{"role": _HH_ROLES[role], "content": text[1:] if text.startswith(" ") else text}
                for role, text in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] != "user":
        raise DefectiveRecord(f"{where}: the turn before the final {HH_ASSISTANT!r} is an Assistant turn, so there "
                              f"is no Human prompt to answer — fix or remove the record (skip_invalid=True drops "
                              f"such records).")
    return messages


# --- rendering -----------------------------------------------------------------------------------

def comparison_example(prompt_messages: list[dict[str, str]], responses: list[str], tok: Tokenizer, max_len: int,
                       num_responses: int, max_prompt_len: int | None = None, where: str = "",
                       template: chat.ChatTemplate = chat.TAGS,
                       fit=None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """One record (module docstring) from responses best first, and info {"truncated_prompt" (0/1),
    "truncated_responses", "dropped_responses", "rendered_tokens" (longest row before truncation)}.

    Beyond num_responses, the worst responses are dropped (a top-K ranking is still a ranking).
    fit: the format's own prompt shortener (tldr.prompt), tried before cutting from the left.
    """
    end = template.end_id(tok)
    if max_len < template.min_prompt_len(tok) + 2:
        raise ValueError(f"max_len={max_len} cannot hold the {template.name!r} template's bos and assistant prefix "
                         f"({template.min_prompt_len(tok)} tokens) and a response; raise config.data.seq_len.")
    dropped = max(0, len(responses) - num_responses)
    responses = responses[:num_responses]
    prompt = chat.render_prompt(prompt_messages, tok, where, template)  # ... assistant prefix
    bodies = template.assistant_bodies(responses, tok)
    longest = max(len(b) for b in bodies)
    keep = max(template.min_prompt_len(tok), min(max_len - longest, max_prompt_len or len(prompt)))
    info = {"truncated_prompt": int(len(prompt) > keep), "truncated_responses": 0, "dropped_responses": dropped,
            "rendered_tokens": len(prompt) + longest}
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
            body = body[:room - 1] + [end]
            info["truncated_responses"] += 1
        row = prompt + body
        tokens[k, :len(row)], input_mask[k, :len(row)], valid[k] = row, 1, 1
    return {"tokens": tokens, "input_mask": input_mask, "valid": valid}, info


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
            builder=self, description=self.__class__.__doc__,
            features=tfds.features.FeaturesDict({
                "tokens": rows, "input_mask": rows,
                "valid": tfds.features.Tensor(shape=(c.num_responses,), dtype=np.int32)}),
            disable_shuffling=True,  # file order, so a line range maps to a contiguous index range
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        c = self.builder_config
        tok = load_tokenizer(c.tokenizer_path)
        template = chat.template_from_spec(c.chat_template) if c.chat_template else chat.TAGS
        records, skipped = _read(c.jsonl_path, c.fmt, c.line_range, c.skip_invalid)
        examples = []
        stats = {"examples": 0, "skipped": skipped, "num_responses": c.num_responses, "responses": 0,
                 "truncated_prompts": 0, "truncated_responses": 0, "dropped_responses": 0, "max_rendered_tokens": 0}
        for r in records:
            ex, info = comparison_example(r["prompt_messages"], r["responses"], tok, c.seq_len, c.num_responses,
                                          c.max_prompt_len, r["where"], template, r["fit"])
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


def build_comparison_dataset(path: str, fmt: str, tokenizer_path: str, max_len: int, data_dir: str,
                             num_responses: int | None = None, max_prompt_len: int | None = None,
                             line_range: tuple[int, int] | None = None, skip_invalid: bool | None = None,
                             template: chat.ChatTemplate = chat.TAGS) -> tuple[Any, dict[str, int]]:
    """Builds (or reuses, keyed by a hash of the arguments and the files) the comparisons in `path`.

    max_len: tokens per response row (L); num_responses: K, default the largest K in the file
    (range); max_prompt_len: optional cap on prompt tokens; template: the chat template. Returns (source, stats): source is a
    random-access sequence of records; stats counts examples, skipped, responses,
    truncated_prompts (examples), truncated_responses, dropped_responses, max_rendered_tokens
    and gives num_responses (K).
    """
    if not isinstance(max_len, (int, np.integer)) or max_len < 4:
        raise ValueError(f"max_len={max_len!r} must be an integer >= 4 (bos, <|assistant|>, one response token, "
                         f"<|end|>).")
    if max_prompt_len is not None and max_prompt_len < 2:
        raise ValueError(f"max_prompt_len={max_prompt_len!r} must be >= 2 (bos and <|assistant|>) or None.")
    template = chat.get_template(template)
    path = lm_datasets._require_file(path, "comparisons JSONL")
    check_line_range(line_range, path)
    if fmt not in FORMATS:
        raise ValueError(f"comparison format {fmt!r} is not one of {FORMATS}.")
    if num_responses is None:
        records, _ = _read(path, fmt, line_range, skip_invalid, warn=False)  # the build warns
        num_responses = max(len(r["responses"]) for r in records)
    elif num_responses < 2:
        raise ValueError(f"num_responses={num_responses} must be >= 2 (or None: the largest K in the file).")
    params = dict(jsonl_path=path, fmt=fmt, tokenizer_path=os.path.abspath(tokenizer_path), seq_len=int(max_len),
                  num_responses=int(num_responses), max_prompt_len=max_prompt_len,
                  line_range=tuple(int(x) for x in line_range) if line_range else None, skip_invalid=skip_invalid,
                  chat_template=None if template == chat.TAGS else template.spec())
    builder = Comparisons(config=ComparisonsConfig(name=lm_datasets._config_name(params), **params),
                          data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    stats = {k: int(v) for k, v in builder.info.metadata.items()}
    return builder.as_data_source(split="train"), stats
