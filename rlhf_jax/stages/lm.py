"""Stages 1–2: causal-LM pretraining and supervised fine-tuning (SFT).

Both minimise next-token cross-entropy over the tokens a batch marks as
targets: every token for pretraining, only response (assistant) tokens for SFT.

    loss = Σ_t loss_mask[t] · −log p(x_t | x_<t) / Σ_t loss_mask[t]     (nats / target token)

Batch records: tokens, input_mask, loss_mask — each int32 [B, L+1]; the model
reads tokens[:, :-1] and predicts tokens[:, 1:].
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import config as config_lib, optim, parallel, perf, train_state
from rlhf_jax.models.gpt import TransformerLM, positions_from_mask
from rlhf_jax.run import Run


def token_losses(params, model: TransformerLM, batch, rng=None):
    """Per-target-token cross-entropy, f32 [B, L], and the target mask [B, L]."""
    tokens, input_mask = batch["tokens"][:, :-1], batch["input_mask"][:, :-1]
    targets = batch["tokens"][:, 1:]
    target_mask = (batch["loss_mask"][:, 1:] * batch["input_mask"][:, 1:]).astype(jnp.float32)
    out = model.apply({"params": params}, tokens, positions_from_mask(input_mask), input_mask,
                      deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
    logits = out["logits"].astype(jnp.float32)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll, target_mask


def make_train_step(model: TransformerLM, tx: optax.GradientTransformation, schedule, grad_accum: int,
                    inject_nonfinite: tuple[int, ...] = ()):
    """step(state, batch) -> (state, metrics). Gradients are averaged over all target tokens of
    the global batch, so grad_accum changes memory, not the result."""

    def summed_loss(params, micro, rng):
        nll, mask = token_losses(params, model, micro, rng)
        return jnp.sum(nll * mask), jnp.sum(mask)

    def step(state: train_state.TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
        grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

        def accumulate(carry, xs):
            i, mb = xs
            (loss_sum, count), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            g, l, c = carry
            return (jax.tree.map(jnp.add, g, grads), l + loss_sum, c + count), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (jnp.arange(grad_accum), micro))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        params, opt_state, nonfinite = train_state.apply_if_finite(
            tx, grads, loss_sum / denom, state.params, state.opt_state, state.nonfinite, state.step, inject_nonfinite)
        metrics = {"train/loss": loss_sum / denom, "train/grad_norm": optax.tree.norm(grads),
                   "train/lr": schedule(state.step), "train/target_tokens": count}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite), metrics

    return step


def make_eval_step(model: TransformerLM):
    def eval_step(params, batch):
        nll, mask = token_losses(params, model, batch)
        return jnp.sum(nll * mask), jnp.sum(mask)

    return eval_step


def datasets(run: Run):
    """(tokenizer, train source, eval source) for the stage in run.config."""
    from rlhf_jax.data import builtin_text, chat, lm_datasets

    c, data_dir = run.config, os.path.join(run.workdir, "data")
    seq_len = c.data.seq_len
    if c.stage == "pretrain":
        path = c.data.path or os.path.join(data_dir, "builtin_corpus.txt")
        if not c.data.path and run.is_main:
            builtin_text.write_builtin_corpus(path, num_chars=c.data.builtin_chars, seed=c.seed)
        if run.is_main or c.data.path:  # the built-in corpus exists for the others once run.tokenizer syncs
            _require(path, "data.path")
        tok = run.tokenizer([path])
        splits = run.main_first(lm_datasets.build_text_dataset, path, os.path.join(run.workdir, "tokenizer.model"),
                                seq_len, data_dir, val_fraction=c.data.val_fraction)
        return tok, splits["train"], splits["validation"]
    train_path, eval_path = c.data.train_path, c.data.eval_path
    if not train_path:
        train_path, eval_path = os.path.join(data_dir, "builtin_sft_train.jsonl"), os.path.join(data_dir, "builtin_sft_eval.jsonl")
        if run.is_main:
            builtin_text.write_builtin_sft(train_path, num_examples=c.data.builtin_examples, seed=c.seed)
            builtin_text.write_builtin_sft(eval_path, num_examples=max(c.data.builtin_examples // 10, 64), seed=c.seed + 1)
    _require(train_path, "data.train_path")
    fmt = c.data.format if c.data.train_path else "chat"  # the built-in demonstrations are chat records
    lines = {"train": tuple(c.data.train_lines) or None, "eval": tuple(c.data.eval_lines) or None}
    eval_path = eval_path or (train_path if lines["eval"] else "")  # eval_lines alone: a held-out range
    corpus = os.path.join(data_dir, "builtin_corpus.txt")
    if not (c.data.get("tokenizer_path") or c.init_from) and run.is_main:
        if c.data.train_path:  # no tokenizer yet: learn one from this data's text
            corpus = lm_datasets.write_demonstration_text(train_path, fmt, lines["train"],
                                                          os.path.join(data_dir, "tokenizer_corpus.txt"))
        else:
            builtin_text.write_builtin_corpus(corpus, seed=c.seed)
    tok = run.tokenizer([corpus])
    tok_path = os.path.join(run.workdir, "tokenizer.model")

    def build(path, split):
        return run.main_first(lm_datasets.build_sft_dataset, path, tok_path, seq_len, data_dir, split=split, fmt=fmt,
                              line_range=lines[split], template=chat.config_template(c.data))

    train, stats = build(train_path, "train")
    run.log(f"sft data {train_path}: {stats}")
    evals = None
    if eval_path:
        _require(eval_path, "data.eval_path")
        evals, eval_stats = build(eval_path, "eval")
        run.log(f"sft eval data {eval_path}: {eval_stats}")
    return tok, train, evals


def _require(path: str, key: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.{key}: {path!r} does not exist. Pass a local file with --config.{key}=...")


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
    if c.data.seq_len > c.model.max_len and c.model.position == "learned":
        raise ValueError(f"config.data.seq_len={c.data.seq_len} exceeds model.max_len={c.model.max_len}.")
    run.write_config()
    model = TransformerLM(config_lib.model_config(c))
    total_steps = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
    tx, schedule = optim.make_optimizer(c.optim, total_steps)

    init = train_state.model_init_fn(model, c.data.seq_len, c.seed)
    state, shardings = train_state.create(init, tx, run.mesh, run.rules, c.seed)
    state, meta = run.restore_or(state)
    if meta is None:
        state = state.replace(params=run.load_init_params(state.params))
    start = int(jax.device_get(state.step))

    batch_sh = parallel.batch_sharding(run.mesh, run.rules)
    with parallel.activate(run.mesh, run.rules):
        step_fn = jax.jit(make_train_step(model, tx, schedule, c.grad_accum, tuple(c.debug_nonfinite_steps)),
                          in_shardings=(shardings, batch_sh), out_shardings=(shardings, parallel.replicated(run.mesh)),
                          donate_argnums=(0,))
        eval_fn = jax.jit(make_eval_step(model), in_shardings=(shardings.params, batch_sh))

    loader = BatchLoader(train_source, c.batch_size, seed=c.seed)
    writer = run.metric_writer(start)
    flops_per_token = perf.train_flops_per_token(model.cfg, c.data.seq_len)
    peak = perf.measured_peak_flops(c.model.dtype)
    run.log(f"{c.stage}: {loader.num_examples} train sequences, steps {start}→{c.num_steps}, "
            f"mesh {dict(run.mesh.shape)}, {sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params")

    last, t_last, steps_since = {}, time.perf_counter(), 0
    bar = run.progress(start, c.num_steps, c.stage)
    with parallel.activate(run.mesh, run.rules):
        for step, local in loader.iterate(start, c.num_steps - start):
            batch = parallel.global_batch(local, run.mesh, run.rules)
            if step == start:
                step_fn = run.compile(f"{c.stage} train step", step_fn, state, batch)
            state, metrics = step_fn(state, batch)
            done, steps_since = step + 1, steps_since + 1
            bar.update(1)
            if step == start:  # the first step compiles: time it apart from throughput
                jax.block_until_ready(state)
                run.log(f"compiled and ran the first step in {time.perf_counter() - t_last:.1f}s")
                t_last, steps_since = time.perf_counter(), 0
            if done % c.log_every == 0 or done == c.num_steps:
                metrics = jax.device_get(metrics)  # the only host sync: once per log interval
                run.check_finite(state)
                dt = time.perf_counter() - t_last
                tokens_per_sec = steps_since * c.batch_size * c.data.seq_len / dt
                last = writer.write(done, {**metrics, "perf/tokens_per_sec": tokens_per_sec,
                                           "perf/mfu": tokens_per_sec * flops_per_token / peak,
                                           "perf/step_time_s": dt / max(steps_since, 1)})
                bar.set_postfix(loss=f"{last['train/loss']:.4f}", tok_s=f"{tokens_per_sec:.0f}")
                t_last, steps_since = time.perf_counter(), 0
            if (done % c.eval_every == 0 or done == c.num_steps) and eval_source is not None:
                ev = evaluate(eval_fn, state.params, eval_source, run, c.eval_batches)
                last.update(writer.write(done, ev))
                run.log(f"step {done}: eval/loss {ev['eval/loss']:.4f}")
                t_last, steps_since = time.perf_counter(), 0  # throughput counts only the steps timed since here
            if done % c.checkpoint.every == 0 or done == c.num_steps or run.preempted:
                run.save(state, {"stage": c.stage, "data_step": done}, force=run.preempted)
                t_last, steps_since = time.perf_counter(), 0  # throughput excludes eval and checkpoint time
            if run.preempted:
                run.log(f"SIGTERM: saved step {done}; rerun the same command to resume.")
                break
    bar.close()
    writer.close()
    run.close()
    return last
