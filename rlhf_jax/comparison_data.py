"""The comparisons a preference stage (the RM, DPO) reads, built in its run's workdir: config.data.train_path /
eval_path in config.data.format, or (empty train_path) the built-in synthetic preference written there; tokenized
with the run's tokenizer (`Run.tokenizer`), trained on this data's text when there is none yet."""

from __future__ import annotations

import os

import numpy as np

from rlhf_jax.data import chat, comparisons
from rlhf_jax.rollout import bucket_width, global_max
from rlhf_jax.run import Run


def datasets(run: Run):
    """(tokenizer, train source, eval source or None, train stats, eval stats). eval_lines without eval_path
    holds out a line range of the training file (e.g. HH-RLHF's last 300)."""
    c = run.config
    data_dir = os.path.join(run.workdir, "data")
    if not c.data.train_path:
        from rlhf_jax.data import builtin_preferences

        c.data.train_path, c.data.eval_path = run.main_first(
            builtin_preferences.write, data_dir, seed=c.seed, n_train=c.data.builtin_examples
        )
        c.data.format = "ranked"
    corpus = os.path.join(data_dir, "tokenizer_corpus.txt")
    if not (c.data.tokenizer_path or c.init_from) and run.is_main:  # no tokenizer yet: learn one from this data
        os.makedirs(data_dir, exist_ok=True)
        found = comparisons.read_comparisons(
            c.data.train_path, c.data.format, line_range=tuple(c.data.train_lines) or None
        )
        with open(corpus, "w") as f:
            for r in found:
                f.writelines(m["content"] + "\n" for m in r["prompt_messages"])
                f.writelines(x + "\n" for x in r["responses"])
    tok = run.tokenizer([corpus])
    train, train_stats = build(run, c.data.train_path, c.data.train_lines)
    eval_path = c.data.eval_path or (c.data.train_path if c.data.eval_lines else "")
    evals, eval_stats = build(run, eval_path, c.data.eval_lines)
    return tok, train, evals, train_stats, eval_stats


def build(run: Run, path: str, line_range):
    """(source, stats) of the comparisons in lines `line_range` of `path` (comparisons.build_comparison_dataset),
    with the tokenizer already in the workdir; (None, {}) for an empty path."""
    if not path:
        return None, {}
    c = run.config
    return run.main_first(
        comparisons.build_comparison_dataset,
        path,
        c.data.format,
        os.path.join(run.workdir, "tokenizer.model"),
        c.data.seq_len,
        os.path.join(run.workdir, "data"),
        num_responses=c.data.num_responses or None,
        line_range=tuple(line_range) if line_range else None,
        template=chat.config_template(c.data),
    )


def trimmed(local: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    """This process's rows of a batch of comparison records (tokens and input_mask [..., L], right-padded,
    prompt_len [B]) cut to bucket_width of the longest row of the global batch (config.data.length_bucket; 0:
    unchanged), so a batch of short pairs spends nothing on the padding to data.seq_len, in few compiled shapes
    (16, 24, 32, 48, 64, ...); with "response_at" int32 [..., R] added: the positions whose next token is a
    response token (forward.sequence_logprobs' targets), in order, then -1, R the bucket_width of the global
    batch's longest response. The LM head runs at those R positions only, not over the prompts."""
    L = local["tokens"].shape[-1]
    width = bucket_width(global_max(local["input_mask"].sum(-1).max(initial=1)), L, bucket, half_octaves=True)
    out = {**local, "tokens": local["tokens"][..., :width], "input_mask": local["input_mask"][..., :width]}
    # position t predicts token t + 1: a target where that token is a response's (forward.response_target_mask)
    target = (np.arange(1, width) >= local["prompt_len"][:, None, None]) & (out["input_mask"][..., 1:] > 0)
    n = target.sum(-1)
    R = bucket_width(global_max(n.max(initial=1)), width - 1, bucket, half_octaves=True)
    positions = np.argsort(~target, axis=-1, kind="stable")[..., :R]  # the targets' positions first, in order
    out["response_at"] = np.where(np.arange(R) < n[..., None], positions, -1).astype(np.int32)
    return out
