"""Reading JSONL record files, the one way every data module does it: (path:line, record) pairs, line
ranges, the reading loop that skips known-defective public records, and the names that key cached
TFDS builds to their inputs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from rlhf_jax.data.chat import DefectiveRecord
from rlhf_jax.data.tokenizer import load_tokenizer
from rlhf_jax.errors import DataError, MissingFileError

SKIP_BY_DEFAULT = ("hh_rlhf", "tldr")  # public files holding a few unusable records
_log = logging.getLogger(__name__)


def require_file(path: str, what: str) -> str:
    """The absolute path of an existing file; FileNotFoundError naming `what` otherwise."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} file {path!r} does not exist; pass a local file path.")
    return os.path.abspath(path)


def read_jsonl(path: str, line_range: tuple[int, int] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, record) per non-blank line of a .jsonl(.gz) file, where = "path:line" (1-based).

    line_range=(start, stop): only lines start <= i < stop, counted from 0 over all lines (blank
    ones too), e.g. (0, 1500) and (1500, 1800) split a file into train and eval.
    """
    require_file(path, "JSONL")
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
                raise DataError(
                    f"{where}: not UTF-8 ({e.reason} at byte {e.start}) — re-save the file as UTF-8."
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}) — each line must be one complete JSON object."
                ) from None
    if line_range is not None and stop > n:
        raise ValueError(
            f"{path}: line_range={tuple(line_range)} reaches line {stop} but the file has {n} lines; use a stop <= {n}."
        )


def check_line_range(line_range: Any, path: str) -> tuple[int, float]:
    """(start, stop) of a valid line_range (None: the whole file); ValueError otherwise."""
    if line_range is None:
        return 0, float("inf")
    ok = (
        isinstance(line_range, (tuple, list))
        and len(line_range) == 2
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in line_range)
    )
    if not ok or not 0 <= line_range[0] < line_range[1]:
        raise ValueError(
            f"{path}: line_range={line_range!r} must be (start, stop) with 0 <= start < stop, "
            f"counting lines from 0, e.g. (0, 1500)."
        )
    return int(line_range[0]), int(line_range[1])


def read_records(
    path: str, fmt: str, line_range, skip_invalid: bool | None, parse, what: str, warn: bool = True
) -> tuple[list[dict[str, Any]], int]:
    """[{**parse(record, where), "where": where}] for the file's records, and how many were skipped.

    The one reading loop of comparisons, prompts and demonstrations: a DefectiveRecord is skipped
    (and counted) when skip_invalid, which None makes True for the public formats (SKIP_BY_DEFAULT);
    any other ValueError names path:line and stops the build.
    """
    skip = fmt in SKIP_BY_DEFAULT if skip_invalid is None else skip_invalid
    out, skipped = [], 0
    for where, record in read_jsonl(path, line_range):
        try:
            out.append({**parse(record, where), "where": where})
        except DefectiveRecord as e:
            if not skip:
                raise
            skipped += 1
            if warn:
                _log.warning("skipped %s", e)
    if not out:
        raise ValueError(
            f"{path}: no usable {fmt} {what}"
            + (f" in lines {tuple(line_range)}" if line_range else "")
            + (f" ({skipped} skipped as defective)" if skipped else "")
            + "; write one JSON object per line."
        )
    return out, skipped


def config_name(params: dict[str, Any], version: str) -> str:
    """seq<L>_<hash of params, each source file's size and mtime, the tokenizer's bytes (and its directory's
    tokenizer_config.json) and `version`>: the TFDS builder-config name under which a build is cached (any
    change to an input builds anew)."""
    paths = params.get("text_paths") or (params["jsonl_path"],)
    stamps = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    tok_path = load_tokenizer(params["tokenizer_path"]).path
    h = hashlib.sha256()
    # the tokenizer_config.json beside a tokenizer holds the chat template of data.chat_template=checkpoint
    for path in (tok_path, os.path.join(os.path.dirname(tok_path), "tokenizer_config.json")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    tok_hash = h.hexdigest()
    key = json.dumps(
        {"params": params, "stamps": stamps, "tokenizer": tok_hash, "version": version}, sort_keys=True, default=list
    )
    return f"seq{params['seq_len']}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
