"""Stage 3: the reward model, trained on ranked comparisons (InstructGPT eq. 1).

Batch records (responses best-first): tokens, input_mask int32 [B, K, L];
valid int32 [B, K]. The reward of a sequence is the reward head read at its
last real token. After training, a gain and bias make rewards on a reference
distribution mean 0 / std 1 (lm-human-preferences); they are saved in
<workdir>/reward_norm.json and applied by `load_reward_model`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import config as config_lib, optim, parallel, perf, preference, train_state
from rlhf_jax.models.gpt import TransformerLM, positions_from_mask
from rlhf_jax.run import Run

NORM_FILE = "reward_norm.json"


def sequence_rewards(params, model: TransformerLM, tokens, input_mask, rng=None):
    """Reward of each sequence, read at its last real token: [N, L] → [N] (f32). Pads may sit on either side."""
    out = model.apply({"params": params}, tokens, positions_from_mask(input_mask), input_mask, heads=("reward",),
                      deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
    last = input_mask.shape[-1] - 1 - jnp.argmax(input_mask[:, ::-1], axis=-1)
    return jnp.take_along_axis(out["rewards"], last[:, None], axis=-1)[:, 0]


def comparison_rewards(params, model, batch, rng=None):
    """[B, K] rewards for the K responses of each comparison."""
    B, K, L = batch["tokens"].shape
    r = sequence_rewards(params, model, batch["tokens"].reshape(B * K, L), batch["input_mask"].reshape(B * K, L), rng)
    return r.reshape(B, K)


def rm_loss(params, model, batch, rm_cfg, rng=None):
    rewards = comparison_rewards(params, model, batch, rng)
    valid = batch["valid"]
    if rm_cfg.loss == "best_of_k":
        loss, stats = preference.best_of_k_loss(rewards, valid)
    else:
        loss, stats = preference.ranking_loss(rewards, valid, margin=rm_cfg.margin)
    if rm_cfg.center_coef:
        loss = loss + preference.centering_penalty(rewards, valid, rm_cfg.center_coef)
    return loss, (rewards, stats)


def batch_metrics(rewards, valid, loss, prefix):
    """Accuracy over all valid pairs, mean chosen / rejected reward and margin; comparisons with < 2 valid
    responses (eval padding rows) are left out."""
    m = preference.comparison_metrics(rewards, valid)
    return {f"{prefix}/loss": loss, **{f"{prefix}/{k}": v for k, v in m.items()}}


def make_train_step(model, tx, schedule, rm_cfg):
    def step(state: train_state.TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, (rewards, _)), grads = jax.value_and_grad(rm_loss, has_aux=True)(
            state.params, model, batch, rm_cfg, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = batch_metrics(rewards, batch["valid"], loss, "rm")
        metrics.update({"rm/grad_norm": optax.tree.norm(grads), "rm/lr": schedule(state.step)})
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    return step


def evaluate(params, model, source, run: Run, rm_cfg, max_batches: int):
    """Held-out loss and accuracy over all valid pairs (exact: counts are summed, not averaged)."""
    from rlhf_jax.data.loader import eval_batches

    with parallel.activate(run.mesh, run.rules):
        fn = jax.jit(lambda p, b: comparison_rewards(p, model, b))
        rewards, valid = [], []
        for local in eval_batches(source, run.config.batch_size, max_batches or None):
            rewards.append(np.asarray(jax.device_get(fn(params, parallel.global_batch(local, run.mesh, run.rules)))))
            valid.append(local["valid"])
    r, v = jnp.asarray(np.concatenate(rewards)), jnp.asarray(np.concatenate(valid))
    keep = v.sum(1) >= 2  # padding rows of the last batch
    r, v = r[keep], v[keep]
    loss, _ = preference.ranking_loss(r, v, margin=rm_cfg.margin)
    return {k: float(x) for k, x in batch_metrics(r, v, loss, "eval/rm").items()}


def reference_rewards(params, model, run: Run, source) -> np.ndarray:
    """Rewards of every valid response in `source` (the reference distribution for normalisation)."""
    from rlhf_jax.data.loader import eval_batches

    out = []
    with parallel.activate(run.mesh, run.rules):
        fn = jax.jit(lambda p, b: comparison_rewards(p, model, b))
        for local in eval_batches(source, run.config.batch_size, None):
            r = np.asarray(jax.device_get(fn(params, parallel.global_batch(local, run.mesh, run.rules))))
            out.append(r[local["valid"] > 0])
    return np.concatenate(out)


def datasets(run: Run):
    from rlhf_jax.data import comparisons

    c = run.config
    data_dir = os.path.join(run.workdir, "data")
    if not c.data.train_path:
        from rlhf_jax.data import builtin_preferences

        c.data.train_path, c.data.eval_path = builtin_preferences.write(data_dir, seed=c.seed,
                                                                      n_train=c.data.builtin_examples)
        c.data.format = "ranked"
    corpus = os.path.join(data_dir, "tokenizer_corpus.txt")
    if not (c.data.tokenizer_path or c.init_from) and run.is_main:  # no tokenizer yet: learn one from this data
        os.makedirs(data_dir, exist_ok=True)
        records = comparisons.read_comparisons(c.data.train_path, c.data.format,
                                               line_range=tuple(c.data.train_lines) or None)
        with open(corpus, "w") as f:
            for r in records:
                f.writelines(m["content"] + "\n" for m in r["prompt_messages"])
                f.writelines(x + "\n" for x in r["responses"])
    tok = run.tokenizer([corpus])
    tok_path = os.path.join(run.workdir, "tokenizer.model")

    def build(path, line_range):
        if not path:
            return None, {}
        rng = tuple(line_range) if line_range else None
        return run.main_first(comparisons.build_comparison_dataset, path, c.data.format, tok_path, c.data.seq_len,
                              data_dir, num_responses=c.data.num_responses or None, line_range=rng)

    train, train_stats = build(c.data.train_path, c.data.train_lines)
    # eval_lines without eval_path holds out a line range of the training file (e.g. HH-RLHF's last 300)
    eval_path = c.data.eval_path or (c.data.train_path if c.data.eval_lines else "")
    evals, eval_stats = build(eval_path, c.data.eval_lines)
    return tok, train, evals, train_stats, eval_stats


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    from rlhf_jax.data.loader import BatchLoader

    run = Run(config, workdir)
    c = run.config
    tok, train_source, eval_source, train_stats, eval_stats = datasets(run)
    run.write_config()
    run.log(f"rm data: train {train_stats}, eval {eval_stats}")
    model = TransformerLM(config_lib.model_config(c))
    total = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
    optim_cfg = ml_collections.ConfigDict(c.optim.to_dict())
    optim_cfg.total_steps = total
    tx, schedule = optim.make_optimizer(optim_cfg)
    state, shardings = train_state.create(train_state.model_init_fn(model, c.data.seq_len, c.seed), tx,
                                          run.mesh, run.rules, c.seed)
    state, meta = run.restore_or(state)
    if meta is None:  # trunk from the earlier stage; the reward head stays freshly initialised
        state = state.replace(params=run.load_init_params(state.params, heads=("trunk",)))
    start = int(jax.device_get(state.step))

    batch_sh = parallel.batch_sharding(run.mesh, run.rules)
    with parallel.activate(run.mesh, run.rules):
        step_fn = jax.jit(make_train_step(model, tx, schedule, c.rm), in_shardings=(shardings, batch_sh),
                          out_shardings=(shardings, parallel.replicated(run.mesh)), donate_argnums=(0,))
    loader = BatchLoader(train_source, c.batch_size, seed=c.seed)
    writer = run.metric_writer(start)
    K = train_source[0]["tokens"].shape[0]
    flops_per_seq = perf.train_flops_per_token(model.cfg, c.data.seq_len) * c.data.seq_len
    peak = perf.measured_peak_flops(c.model.dtype)
    run.log(f"rm: {loader.num_examples} comparisons (K={K}), steps {start}→{c.num_steps}")

    last, t_last, since = {}, time.perf_counter(), 0
    bar = run.progress(start, c.num_steps, "rm")
    with parallel.activate(run.mesh, run.rules):
        for step, local in loader.iterate(start, c.num_steps - start):
            state, metrics = step_fn(state, parallel.global_batch(local, run.mesh, run.rules))
            done, since = step + 1, since + 1
            bar.update(1)
            if step == start:  # the first step compiles: time it apart from throughput
                jax.block_until_ready(state)
                run.log(f"compiled and ran the first step in {time.perf_counter() - t_last:.1f}s")
                t_last, since = time.perf_counter(), 0
            if done % c.log_every == 0 or done == c.num_steps:
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t_last
                seqs = since * c.batch_size * K / dt
                last = writer.write(done, {**metrics, "perf/tokens_per_sec": seqs * c.data.seq_len,
                                           "perf/samples_per_sec": seqs, "perf/mfu": seqs * flops_per_seq / peak})
                bar.set_postfix(loss=f"{last['rm/loss']:.4f}", acc=f"{last['rm/accuracy']:.3f}")
                t_last, since = time.perf_counter(), 0
            if (done % c.eval_every == 0 or done == c.num_steps) and eval_source is not None:
                ev = evaluate(state.params, model, eval_source, run, c.rm, c.eval_batches)
                last.update(writer.write(done, ev))
                run.log(f"step {done}: eval/rm/accuracy {ev['eval/rm/accuracy']:.4f} loss {ev['eval/rm/loss']:.4f}")
                t_last = time.perf_counter()
            if done == c.num_steps:
                norm = normalise(state.params, model, run, train_source)
                last.update(writer.write(done, {"rm/norm_gain": norm["gain"], "rm/norm_bias": norm["bias"]}))
            if done % c.checkpoint.every == 0 or done == c.num_steps or run.preempted:
                run.save(state, {"stage": "rm", "data_step": done}, force=run.preempted)
                t_last = time.perf_counter()
            if run.preempted:
                run.log(f"SIGTERM: saved step {done}; rerun the same command to resume.")
                break
    bar.close()
    writer.close()
    run.close()
    return last


def normalise(params, model, run: Run, train_source) -> dict[str, float]:
    """Gain/bias so rewards on the reference distribution have mean 0, std 1; written to reward_norm.json.

    Reference (config.rm.normalize_on): "comparisons" — every response of the RM training set, which in the
    InstructGPT pipeline are samples of the initial (SFT) policy; "none" — gain 1, bias 0.
    """
    if run.config.rm.normalize_on == "none":
        gain, bias, n = 1.0, 0.0, 0
    else:
        r = reference_rewards(params, model, run, train_source)
        gain, bias = (float(x) for x in preference.normalization_from_rewards(jnp.asarray(r)))
        n = int(r.size)
    norm = {"gain": gain, "bias": bias, "reference": run.config.rm.normalize_on, "num_rewards": n}
    if run.is_main:
        path = os.path.join(run.workdir, NORM_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(norm, f, indent=2)
        os.replace(path + ".tmp", path)
    run.log(f"reward normalisation: gain {gain:.4f} bias {bias:.4f} over {n} reference responses")
    return norm


def load_reward_model(workdir: str, mesh, rules, dtype: str | None = None):
    """(model, params, norm) of a trained RM workdir, params sharded on `mesh`.

    Score with `score_sequences(params, model, norm, tokens, input_mask)`; jit it as you like.
    """
    from rlhf_jax import checkpoint

    src = checkpoint.read_run_config(workdir)
    if src is None:
        raise FileNotFoundError(f"{workdir!r} is not an RM workdir (no config.json). Train one with configs/rm.py.")
    model_cfg = dict(src["model"], dropout=0.0, **({"dtype": dtype} if dtype else {}))
    model = TransformerLM(config_lib.ModelConfig(**model_cfg))
    like, _ = parallel.sharded_init(train_state.model_init_fn(model, 8, 0), mesh, rules)
    params = checkpoint.load_params(workdir, like)
    norm_path = os.path.join(workdir, NORM_FILE)
    if not os.path.exists(norm_path):
        raise FileNotFoundError(f"{norm_path} is missing: the RM run in {workdir} did not finish. Rerun it.")
    with open(norm_path) as f:
        norm = json.load(f)
    return model, params, norm


def score_sequences(params, model, norm, tokens, input_mask):
    """Normalised reward of sequences [N, L] (pads on either side) → [N]."""
    r = sequence_rewards(params, model, tokens, input_mask)
    return preference.apply_normalization(r, norm["gain"], norm["bias"])
