"""Stages 1–2: causal-LM pretraining and supervised fine-tuning (SFT).

Both minimise next-token cross-entropy over the tokens a batch marks as
targets: every token for pretraining, only response (assistant) tokens for SFT.

    loss = Σ_t loss_mask[t] · −log p(x_t | x_<t) / Σ_t loss_mask[t]     (nats / target token)

Batch records: tokens, input_mask, loss_mask — each int32 [B, L+1]; the model
reads tokens[:, :-1] and predicts tokens[:, 1:].
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import forward, parallel, perf, train_state
from rlhf_jax.errors import MissingFileError
from rlhf_jax.loop import LoopTail
from rlhf_jax.models.gpt import TransformerLM
from rlhf_jax.run import Run


def make_train_step(
    model: TransformerLM,
    tx: optax.GradientTransformation,
    schedule,
    grad_accum: int,
    inject_nonfinite: tuple[int, ...] = (),
):
    """step(state, batch) -> (state, metrics). Gradients are averaged over all target tokens of
    the global batch, so grad_accum changes memory, not the result."""

    def summed_loss(params, micro, rng):  # (summed NLL, target tokens): divided by the batch's tokens below
        return forward.summed_token_nll(params, model, micro, rng)

    def step(state: train_state.TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        loss_sum, grads, counts = train_state.accumulate_grads(summed_loss, state.params, batch, rng, grad_accum)
        count = jnp.sum(counts)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        params, opt_state, nonfinite = train_state.apply_if_finite(
            tx, grads, loss_sum / denom, state.params, state.opt_state, state.nonfinite, state.step, inject_nonfinite
        )
        metrics = {
            "train/loss": loss_sum / denom,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step),
            "train/target_tokens": count,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite), metrics

    return step


def jit_train_step(model, tx, schedule, c, shardings, mesh, rules):
    """The stage's jitted step with its shardings; the state is donated. rlhf_jax/plan.py compiles this same
    function from shapes, so the planner measures the step the stage runs."""
    with parallel.activate(mesh, rules):
        return jax.jit(
            make_train_step(model, tx, schedule, c.grad_accum, tuple(c.debug_nonfinite_steps)),
            in_shardings=(shardings, parallel.batch_sharding(mesh, rules)),
            out_shardings=(shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )


def datasets(run: Run):
    """(tokenizer, train source, eval source) for the stage in run.config."""
    from rlhf_jax.data import chat, lm_datasets
    from rlhf_jax.tasks import builtin_text

    c, data_dir = run.config, os.path.join(run.workdir, "data")
    seq_len = c.data.seq_len
    if c.stage == "pretrain":
        return _pretrain_datasets(run, data_dir)
    train_path, eval_path = c.data.train_path, c.data.eval_path
    if not train_path:
        train_path, eval_path = (os.path.join(data_dir, f"builtin_sft_{split}.jsonl") for split in ("train", "eval"))
        if run.is_main:
            n = c.data.builtin_examples
            builtin_text.write_builtin_sft(train_path, num_examples=n, seed=c.seed)
            builtin_text.write_builtin_sft(eval_path, num_examples=max(n // 10, 64), seed=c.seed + 1)
    _require(train_path, "data.train_path")
    fmt = c.data.format if c.data.train_path else "chat"  # the built-in demonstrations are chat records
    lines = {"train": tuple(c.data.train_lines) or None, "eval": tuple(c.data.eval_lines) or None}
    eval_path = eval_path or (train_path if lines["eval"] else "")  # eval_lines alone: a held-out range
    corpus = os.path.join(data_dir, "builtin_corpus.txt")
    if not (c.data.get("tokenizer_path") or c.init_from) and run.is_main:
        if c.data.train_path:  # no tokenizer yet: learn one from this data's text
            corpus = lm_datasets.write_demonstration_text(
                train_path, fmt, lines["train"], os.path.join(data_dir, "tokenizer_corpus.txt")
            )
        else:
            builtin_text.write_builtin_corpus(corpus, seed=c.seed)
    tok = run.tokenizer([corpus])
    tok_path = os.path.join(run.workdir, "tokenizer.model")

    def build(path, split):
        return run.main_first(
            lm_datasets.build_sft_dataset,
            path,
            tok_path,
            seq_len,
            data_dir,
            split=split,
            fmt=fmt,
            line_range=lines[split],
            template=chat.config_template(c.data),
        )

    train, stats = build(train_path, "train")
    run.log(f"sft data {train_path}: {stats}")
    evals = None
    if eval_path:
        _require(eval_path, "data.eval_path")
        evals, eval_stats = build(eval_path, "eval")
        run.log(f"sft eval data {eval_path}: {eval_stats}")
    return tok, train, evals


def _pretrain_datasets(run: Run, data_dir: str):
    """(tokenizer, train, validation) of the pretraining corpus: data.path, else the built-in corpus."""
    from rlhf_jax.data import lm_datasets
    from rlhf_jax.tasks import builtin_text

    c = run.config
    path = c.data.path or os.path.join(data_dir, "builtin_corpus.txt")
    if not c.data.path and run.is_main:
        builtin_text.write_builtin_corpus(path, num_chars=c.data.builtin_chars, seed=c.seed)
    if run.is_main or c.data.path:  # the built-in corpus exists for the others once run.tokenizer syncs
        _require(path, "data.path")
    tok = run.tokenizer([path])
    splits = run.main_first(
        lm_datasets.build_text_dataset,
        path,
        os.path.join(run.workdir, "tokenizer.model"),
        c.data.seq_len,
        data_dir,
        val_fraction=c.data.val_fraction,
    )
    return tok, splits["train"], splits["validation"]


def _require(path: str, key: str):
    if not os.path.exists(path):
        raise MissingFileError(f"config.{key}: {path!r} does not exist. Pass a local file with --config.{key}=...")


def evaluate(eval_fn, params, source, run: Run, max_batches: int) -> dict[str, float]:
    from rlhf_jax.data.loader import eval_batches

    total, count = 0.0, 0.0
    for local in eval_batches(source, run.config.batch_size, max_batches or None):
        s, n = eval_fn(params, parallel.global_batch(local, run.mesh, run.rules))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 50.0)))}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) a pretrain / SFT stage; returns the last logged metrics."""
    from rlhf_jax.data.loader import BatchLoader

    run = Run(config, workdir)
    c = run.config
    tok, train_source, eval_source = datasets(run)
    model, tx, schedule, state, shardings = run.setup_state(start=run.init_heads(("trunk", "lm_head")))
    state, _ = run.restore_or(state)
    start = int(jax.device_get(state.step))

    batch_sh = parallel.batch_sharding(run.mesh, run.rules)
    step_fn = jit_train_step(model, tx, schedule, c, shardings, run.mesh, run.rules)
    with parallel.activate(run.mesh, run.rules):
        eval_fn = jax.jit(lambda p, b: forward.summed_token_nll(p, model, b), in_shardings=(shardings.params, batch_sh))

    evaluate_at = (
        None
        if eval_source is None
        else lambda params: lambda: evaluate(eval_fn, params, eval_source, run, c.eval_batches)
    )  # params → evaluate()
    loader = BatchLoader(train_source, c.batch_size, seed=c.seed)
    tokens_per_step = c.batch_size * c.data.seq_len
    tail = LoopTail(
        run,
        start,
        c.stage,
        tokens_per_step=tokens_per_step,
        postfix={"loss": "train/loss"},
        flops_per_step=tokens_per_step * perf.train_flops_per_token(model.cfg, c.data.seq_len),
    )
    run.log(
        f"{c.stage}: {loader.num_examples} train sequences, steps {start}→{c.num_steps}, "
        f"mesh {dict(run.mesh.shape)}, {sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params"
    )

    with parallel.activate(run.mesh, run.rules):
        for step, local in loader.iterate(start, c.num_steps - start):
            batch = parallel.global_batch(local, run.mesh, run.rules)
            step_fn = tail.compile_once(f"{c.stage} train step", step_fn, state, batch)
            state, metrics = step_fn(state, batch)
            if tail.end_step(step + 1, state, metrics, evaluate=evaluate_at and evaluate_at(state.params)):
                break
    return tail.close()
