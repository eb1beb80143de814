"""Stage 3: the reward model, trained on ranked comparisons (InstructGPT eq. 1).

Batch records (responses best-first): tokens, input_mask int32 [B, K, L];
valid int32 [B, K]. The reward of a sequence is the reward head read at its
last real token, so pads on either side change nothing. After training, a gain
and bias make rewards on a reference distribution (config.rm.normalize_on: the
training responses, or fresh samples of the initial policy) mean 0 / std 1
(lm-human-preferences); they are saved in <workdir>/reward_norm.json, returned
by `trained.load_reward_model` and applied by `forward.score_sequences`.
rm.normalize_before also normalises the fresh reward head before training.

An ensemble (rm.ensemble_size = E > 1) is E reward models trained in one jitted step: params, optimizer
state, RNG and batch carry a leading member axis ("ensemble", unsharded: each member shards like one RM)
and one member's update is vmapped over it. Member i is exactly the single RM of seed + i — its reward
head's initialisation, its data order (and, with rm.bootstrap, its resample of the comparisons), its
dropout — with the trunk every member starts from init_from. Each member is normalised on its own
(reward_norm.json holds E gains and biases); the policy stages combine members by reward.aggregate.

Throughput: perf/samples_per_sec counts scored sequences (B·K per step),
perf/tokens_per_sec their L padded positions each.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import comparison_data, forward, parallel, perf, preference, rollout as rollouts, train_state
from rlhf_jax.errors import ConfigError
from rlhf_jax.loop import LoopTail
from rlhf_jax.run import Run
from rlhf_jax.trained import NORM_FILE

LOSSES = ("ranking", "best_of_k")
NORM_REFERENCES = ("comparisons", "policy_samples", "none")


def _preference_loss(rewards, valid, rm_cfg):
    """(mean loss f32 [], stats) of config.rm.loss over the comparisons of [B, K] rewards."""
    if rm_cfg.loss == "best_of_k":
        return preference.best_of_k_loss(rewards, valid)
    return preference.ranking_loss(rewards, valid, margin=rm_cfg.margin)


def _denominators(valid, rm_cfg) -> tuple[jax.Array, jax.Array]:
    """(comparisons the preference loss averages over, valid responses) of a batch [B, K], each >= 1: both
    depend on `valid` only, so the loss over microbatches can be weighted by the whole batch's counts."""
    n_resp = jnp.sum(valid > 0).astype(jnp.float32)
    return preference.num_compared(lambda r, v: _preference_loss(r, v, rm_cfg), valid), jnp.maximum(n_resp, 1.0)


def _weighted_loss(params, model, batch, rm_cfg, rng, denominators):
    """A (micro)batch's share of the loss of a batch whose counts are `denominators`: summed over its
    comparisons and responses, divided by the whole batch's. The shares add up to `rm_loss`."""
    rewards = forward.comparison_rewards(params, model, batch, rng)
    valid = batch["valid"]
    n_ex, n_resp = denominators
    mean, stats = _preference_loss(rewards, valid, rm_cfg)
    loss = mean * stats["num_examples"] / n_ex
    if rm_cfg.center_coef:
        mean_sq = preference.centering_penalty(rewards, valid, rm_cfg.center_coef)
        loss = loss + mean_sq * jnp.sum(valid > 0) / n_resp
    return loss, (rewards, stats)


def rm_loss(params, model, batch, rm_cfg, rng=None):
    """InstructGPT eq. 1 (or best-of-K, config.rm.loss) averaged over the batch's comparisons, plus
    the optional centering penalty: (loss f32 [], (rewards [B, K], stats))."""
    return _weighted_loss(params, model, batch, rm_cfg, rng, _denominators(batch["valid"], rm_cfg))


def batch_metrics(rewards, valid, loss, prefix):
    """Accuracy over all valid pairs, mean chosen / rejected reward and margin; comparisons with < 2 valid
    responses (eval padding rows) are left out."""
    m = preference.comparison_metrics(rewards, valid)
    return {f"{prefix}/loss": loss, **{f"{prefix}/{k}": v for k, v in m.items()}}


def _make_update(model, tx, rm_cfg, grad_accum: int, inject_nonfinite: tuple[int, ...]):
    """One RM's update: (params, opt_state, rng, nonfinite, step, batch) → (params, opt_state, nonfinite,
    {"loss", "rewards" [B, K], "grad_norm"}). The batch is cut into `grad_accum` microbatches whose losses
    are weighted by the whole batch's counts, so grad_accum changes memory, not the result."""

    def update(params, opt_state, rng_data, nonfinite, step, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), step)
        denominators = _denominators(batch["valid"], rm_cfg)
        share = lambda p, mb, r: _weighted_loss(p, model, mb, rm_cfg, r, denominators)
        loss, grads, (rewards, _) = train_state.accumulate_grads(share, params, batch, rng, grad_accum)
        rewards = rewards.reshape(batch["valid"].shape)  # [A, B/A, K] → [B, K], rows in batch order
        params, opt_state, nonfinite = train_state.apply_if_finite(
            tx, grads, loss, params, opt_state, nonfinite, step, inject_nonfinite
        )
        return params, opt_state, nonfinite, {"loss": loss, "rewards": rewards, "grad_norm": optax.tree.norm(grads)}

    return update


def make_train_step(
    model, tx, schedule, rm_cfg, grad_accum: int = 1, inject_nonfinite: tuple[int, ...] = (), members: int = 0
):
    """step(state, batch) -> (state, metrics) of one RM, or (members > 1) of an ensemble: the update vmapped
    over the member axis of params, optimizer state, RNG and batch [E, B, K, L]. An update skipped for a
    non-finite loss is skipped for that member alone and counted in state.nonfinite like one RM's."""
    update = _make_update(model, tx, rm_cfg, grad_accum, inject_nonfinite)

    def step(state: train_state.TrainState, batch):
        if members > 1:
            params, opt_state, nf, out = jax.vmap(update, in_axes=(0, 0, 0, None, None, 0))(
                state.params, state.opt_state, state.rng, state.nonfinite, state.step, batch
            )
            # Each member returns [count, first] from the shared counter: add their new skips; the first bad
            # step is this one if any member set it (max: the others kept -1 or the same earlier step).
            nonfinite = jnp.stack([state.nonfinite[0] + jnp.sum(nf[:, 0] - state.nonfinite[0]), jnp.max(nf[:, 1])])
            metrics = {}
            for e in range(members):
                metrics.update(batch_metrics(out["rewards"][e], batch["valid"][e], out["loss"][e], f"rm/member_{e}"))
                metrics[f"rm/member_{e}/grad_norm"] = out["grad_norm"][e]
            # rm/<metric>: the members' mean (each member sees its own batch)
            for key in [k.split("/", 2)[2] for k in metrics if k.startswith("rm/member_0/")]:
                metrics[f"rm/{key}"] = jnp.mean(jnp.stack([metrics[f"rm/member_{e}/{key}"] for e in range(members)]))
        else:
            params, opt_state, nonfinite, out = update(
                state.params, state.opt_state, state.rng, state.nonfinite, state.step, batch
            )
            metrics = batch_metrics(out["rewards"], batch["valid"], out["loss"], "rm")
            metrics["rm/grad_norm"] = out["grad_norm"]
        metrics["rm/lr"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite), metrics

    return step


def jit_train_step(model, tx, schedule, c, shardings, mesh, rules):
    """The stage's jitted step with its shardings (an ensemble's batch sharded after its member axis); the
    state is donated. rlhf_jax/plan.py compiles this same function from shapes."""
    E = c.rm.ensemble_size if c.rm.ensemble_size > 1 else 0
    batch_sh = parallel.batch_sharding(mesh, rules, ndim=2 if E else 1, lead=1 if E else 0)
    with parallel.activate(mesh, rules):
        return jax.jit(
            make_train_step(model, tx, schedule, c.rm, c.grad_accum, tuple(c.debug_nonfinite_steps), members=E),
            in_shardings=(shardings, batch_sh),
            out_shardings=(shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )


def make_reward_fn(model, members: int = 0):
    """jitted (params, batch) -> rewards f32 [E, B, K] of each member (E = 1 for one RM), deterministic
    (no dropout). Build it once: each new function object would compile again."""
    return jax.jit(
        forward.over_members(lambda params, batch: forward.comparison_rewards(params, model, batch), members)
    )


def _all_rewards(reward_fn, params, source, run: Run, max_batches: int | None):
    """(rewards f32 [E, N, K], valid [N, K]) of the comparisons in `source`, padding rows included."""
    from rlhf_jax.data.loader import eval_batches

    rewards, valid = [], []
    with parallel.activate(run.mesh, run.rules):
        for local in eval_batches(source, run.config.batch_size, max_batches):
            batch = parallel.global_batch(local, run.mesh, run.rules)
            rewards.append(parallel.to_host(reward_fn(params, batch)))
            valid.append(parallel.to_host(batch["valid"]))
    return np.concatenate(rewards, axis=1), np.concatenate(valid)


def evaluate(reward_fn, params, source, run: Run, rm_cfg, max_batches: int):
    """Held-out loss (config.rm.loss, no centering) and accuracy over all valid pairs (exact: the
    rewards of every comparison are gathered first, then reduced once)."""
    r, v = _all_rewards(reward_fn, params, source, run, max_batches or None)
    keep = v.sum(1) >= 2  # padding rows of the last batch
    r, v = jnp.asarray(r[:, keep]), jnp.asarray(v[keep])
    out = {}
    if r.shape[0] > 1:  # an ensemble: each member, then eval/rm/* of the members' mean reward
        for e in range(r.shape[0]):
            out.update(batch_metrics(r[e], v, _preference_loss(r[e], v, rm_cfg)[0], f"eval/rm/member_{e}"))
        out["eval/rm/member_accuracy_mean"] = jnp.mean(
            jnp.stack([out[f"eval/rm/member_{e}/accuracy"] for e in range(r.shape[0])])
        )
        out["eval/rm/disagreement"] = preference.ranking_disagreement(r, v)
    mean = jnp.mean(r, axis=0)
    out.update(batch_metrics(mean, v, _preference_loss(mean, v, rm_cfg)[0], "eval/rm"))
    return {k: float(x) for k, x in out.items()}


def reference_rewards(reward_fn, params, run: Run, source) -> np.ndarray:
    """Rewards f32 [E, M] of every valid response in `source` (the reference distribution for normalisation)."""
    r, v = _all_rewards(reward_fn, params, source, run, None)
    return r[:, v > 0]


def policy_sample_rewards_fn(run: Run, model, members: int = 0):
    """rewards(rm_params, draw) → f32 [E, M]: the RM's (each member's) raw rewards of M = rm.normalize_samples
    (rounded up to whole batches of batch_size) fresh responses of the initial policy — init_from's trunk and LM
    head — to the prompts of config.data, sampled with config.rollout (lm-human-preferences
    train_reward.py:191-199, 212).
    Each `draw` takes its own prompts and sampling keys, so the samples before and after training differ."""
    from rlhf_jax.data.loader import BatchLoader

    c = run.config
    tok, prompts, _ = rollouts.prompt_data(run)
    policy = _init_from_params(run, model, ("trunk", "lm_head"))  # one model's, also for an ensemble
    B, n_batches = c.batch_size, -(-c.rm.normalize_samples // c.batch_size)
    with parallel.activate(run.mesh, run.rules):
        rollout_fn = jax.jit(rollouts.make_rollout_fn(model, c, tok))
        score_fn = jax.jit(
            forward.over_members(lambda p, tokens, mask: forward.sequence_rewards(p, model, tokens, mask), members)
        )

    def rewards(rm_params, draw: int) -> np.ndarray:
        seed = c.seed + 1000 * (draw + 1)
        loader, out = BatchLoader(prompts, B, seed=seed), []
        with parallel.activate(run.mesh, run.rules):
            for i in range(n_batches):
                batch = rollouts.prompt_batch(loader, i, 1, run)
                keys = rollouts.sample_keys(seed, i, B, run)
                rollout = rollout_fn(policy, batch["prompt"], batch["prompt_mask"], keys)
                tokens, mask = rollouts.joined(rollout)
                out.append(parallel.to_host(score_fn(rm_params, tokens, mask)))
        return np.concatenate(out, axis=1)

    return rewards


def _init_from_params(run: Run, model, heads: tuple[str, ...]):
    """{head: params} of one model from init_from, read into a single model's shardings (new arrays: none
    backs the donated train state, and an ensemble's own params have a member axis)."""
    c = run.config
    like = parallel.abstract_params(train_state.model_init_fn(model, c.data.seq_len, c.seed), run.mesh, run.rules)
    loaded = run.load_init_params(like, heads=heads)
    return {k: loaded[k] for k in heads if k in loaded}  # a tied LM head has no params of its own


def ensemble_from_init(run: Run, model, params, shardings):
    """An ensemble's params with every member's trunk set to init_from's (the reward heads keep their own
    initialisations): one copy read, broadcast over the member axis into the ensemble's shardings."""
    trunk = _init_from_params(run, model, ("trunk",))["trunk"]
    E = jax.tree.leaves(params["reward_head"])[0].shape[0]
    stacked = jax.jit(
        lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (E, *x.shape)), t), out_shardings=shardings["trunk"]
    )(trunk)
    return {**params, "trunk": stacked}


def check_config(c: ml_collections.ConfigDict) -> None:
    """Rejects RM settings that would otherwise be silently misread; run before any data is built."""
    if c.rm.loss not in LOSSES:
        raise ConfigError(f"config.rm.loss={c.rm.loss!r} is not a loss. Use one of {LOSSES}.")
    if c.rm.normalize_on not in NORM_REFERENCES:
        raise ConfigError(f"config.rm.normalize_on={c.rm.normalize_on!r} is unknown. Use one of {NORM_REFERENCES}.")
    if c.rm.normalize_before and c.rm.normalize_on == "none":
        raise ConfigError(
            "config.rm.normalize_before=True needs a reference: set rm.normalize_on to "
            "'policy_samples' (lm-human-preferences) or 'comparisons'."
        )
    if c.rm.normalize_on == "policy_samples":
        if not c.init_from:
            raise ConfigError(
                "config.rm.normalize_on='policy_samples' samples the initial policy: set "
                "config.init_from to the SFT (or pretrain) workdir."
            )
        if c.rm.normalize_samples <= 0:
            raise ConfigError(f"config.rm.normalize_samples={c.rm.normalize_samples} must be positive (e.g. 256).")
        if c.rollout.temperature <= 0:
            raise ConfigError(
                f"config.rollout.temperature={c.rollout.temperature}: the normalisation samples the "
                f"policy as PPO does; use PPO's rollout temperature (e.g. 0.7)."
            )
        if c.model.position == "learned" and c.data.max_prompt_len + c.rollout.max_new_tokens > c.model.max_len:
            raise ConfigError(
                f"config.data.max_prompt_len + rollout.max_new_tokens = {c.data.max_prompt_len} + "
                f"{c.rollout.max_new_tokens} exceeds model.max_len={c.model.max_len}; lower them to "
                f"PPO's (the policy samples must be what PPO will score)."
            )
    if not isinstance(c.rm.ensemble_size, int) or c.rm.ensemble_size < 1:
        raise ConfigError(f"config.rm.ensemble_size={c.rm.ensemble_size!r} must be a positive integer (1: one RM).")
    if c.rm.center_coef < 0:
        raise ConfigError(f"config.rm.center_coef={c.rm.center_coef} must be >= 0 (0 disables the penalty).")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) the RM stage; returns the last logged metrics."""
    from rlhf_jax.data.loader import BatchLoader

    run = Run(config, workdir)
    c = run.config
    check_config(c)
    tok, train_source, eval_source, train_stats, eval_stats = comparison_data.datasets(run)
    run.log(f"rm data: train {train_stats}, eval {eval_stats}")
    E = c.rm.ensemble_size if c.rm.ensemble_size > 1 else 0  # 0: one RM, params without a member axis
    init = (lambda model: train_state.ensemble_init_fn(model, c.data.seq_len, c.seed, E)) if E else None
    # A fresh run: the trunk from the earlier stage; the reward head stays freshly initialised.
    model, tx, schedule, state, shardings = run.setup_state(
        init, members=E, start=None if E else run.init_heads(("trunk",))
    )
    state, meta = run.restore_or(state)
    reward_fn = make_reward_fn(model, E)
    if c.rm.normalize_on == "policy_samples":
        reference = policy_sample_rewards_fn(run, model, E)
    else:
        reference = lambda params, draw: reference_rewards(reward_fn, params, run, train_source)
    if meta is None:
        if E and c.init_from:
            state = state.replace(params=ensemble_from_init(run, model, state.params, shardings.params))
        if c.rm.normalize_before:
            state = state.replace(params=normalise_head(state.params, reference(state.params, 0), run))
    start = int(jax.device_get(state.step))

    lead = 1 if E else 0  # an ensemble's batch is [E, B, K, L]: member i's rows are its own loader's
    step_fn = jit_train_step(model, tx, schedule, c, shardings, run.mesh, run.rules)
    loaders = [BatchLoader(member_source(train_source, c, i), c.batch_size, seed=c.seed + i) for i in range(E or 1)]
    tail = _loop_tail(run, model, state, start, loaders[0].num_examples, train_source[0]["tokens"].shape[0], E)

    evaluate_at = (
        None
        if eval_source is None
        else lambda params: lambda: evaluate(reward_fn, params, eval_source, run, c.rm, c.eval_batches)
    )  # → evaluate()
    # At the last step, before the final checkpoint: a saved final step always has its norm file.
    norm_metrics = lambda: normalization_metrics(normalise(reference, state.params, run, c.num_steps))
    iterators = [loader.iterate(start, c.num_steps - start) for loader in loaders]
    with parallel.activate(run.mesh, run.rules):
        for members_batches in zip(*iterators):
            step = members_batches[0][0]
            batch = parallel.global_batch(_stacked(members_batches, E), run.mesh, run.rules, lead=lead)
            step_fn = tail.compile_once("rm train step", step_fn, state, batch)
            state, metrics = step_fn(state, batch)
            if tail.end_step(
                step + 1, state, metrics, on_last=norm_metrics, evaluate=evaluate_at and evaluate_at(state.params)
            ):
                break
    return tail.close()


def normalization_metrics(norm: dict) -> dict[str, float]:
    """rm/norm_gain and rm/norm_bias of `normalise`'s result; an ensemble's per member (rm/member_<e>/...)."""
    if norm["ensemble_size"] > 1:
        return {
            **{f"rm/member_{e}/norm_gain": g for e, g in enumerate(norm["gain"])},
            **{f"rm/member_{e}/norm_bias": b for e, b in enumerate(norm["bias"])},
        }
    return {"rm/norm_gain": norm["gain"], "rm/norm_bias": norm["bias"]}


def member_source(source, c, member: int):
    """The comparisons member `member` trains on: all of them, or (rm.bootstrap) a bootstrap resample drawn
    with seed + member — for a single RM (member 0), the resample of its seed."""
    from rlhf_jax.data.loader import bootstrap

    return bootstrap(source, c.seed + member) if c.rm.bootstrap else source


def _normalizations(rewards: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(gain [E], bias [E]) making each member's raw rewards of the reference [E, M] mean 0 / std 1."""
    return jax.vmap(preference.normalization_from_rewards)(jnp.asarray(rewards))


def normalise_head(params, rewards: np.ndarray, run: Run):
    """params with the reward head rescaled so `rewards` [E, M] (its raw rewards of the reference; each
    member's for an ensemble) become mean 0 / std 1: lm-human-preferences' normalize_before
    (train_reward.py:232-234; target 0 / 1 for best-of-K labels, :155-156), folded into the head instead of
    a separate trainable gain and bias."""
    gain, bias = _normalizations(rewards)
    head = params["reward_head"]
    if rewards.shape[0] > 1:
        new = jax.vmap(preference.fold_normalization)(head, gain, bias)
    else:
        new = preference.fold_normalization(head, gain[0], bias[0])
    run.log(
        f"reward normalisation before training: gain {np.round(np.asarray(gain), 4).tolist()} bias "
        f"{np.round(np.asarray(bias), 4).tolist()} over {rewards.shape[1]} reference responses"
    )
    return {**params, "reward_head": jax.tree.map(lambda x, old: jax.device_put(x, old.sharding), new, head)}


def normalise(reference, params, run: Run, step: int) -> dict[str, float]:
    """Gain/bias so rewards on the reference distribution have mean 0, std 1; written to reward_norm.json
    with the step of the params it describes. reference(params, draw) → raw rewards [M].

    Reference (config.rm.normalize_on): "comparisons" — every response of the RM training set, which in the
    InstructGPT pipeline are samples of the initial (SFT) policy; "policy_samples" — rm.normalize_samples fresh
    samples of the initial policy at config.rollout's temperature (lm-human-preferences normalize_after,
    train_reward.py:252-254); "none" — gain 1, bias 0. An ensemble's E members each get their own
    (lists of E gains and biases, "ensemble_size": E).
    """
    c = run.config
    E = c.rm.ensemble_size
    if c.rm.normalize_on == "none":
        gain, bias, n = [1.0] * E, [0.0] * E, 0
    else:
        r = reference(params, 1)
        gain, bias = (np.asarray(x, np.float64).tolist() for x in _normalizations(r))
        n = int(r.shape[1])
    if E == 1:
        gain, bias = gain[0], bias[0]
    norm = {
        "gain": gain,
        "bias": bias,
        "ensemble_size": E,
        "reference": c.rm.normalize_on,
        "num_rewards": n,
        "step": step,
    }
    if run.is_main:
        path = os.path.join(run.workdir, NORM_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(norm, f, indent=2)
        os.replace(path + ".tmp", path)
    run.log(
        f"reward normalisation: gain {np.round(gain, 4).tolist()} bias {np.round(bias, 4).tolist()} over {n} "
        f"reference responses"
    )
    return norm


def _stacked(members_batches, E: int) -> dict:
    """One step's host batch: the loader's, or the E members' stacked on a leading member axis."""
    if not E:
        return members_batches[0][1]
    return {k: np.stack([b[k] for _, b in members_batches]) for k in members_batches[0][1]}


def _loop_tail(run: Run, model, state, start: int, n_examples: int, K: int, E: int) -> LoopTail:
    """The loop's tail, counting what a step scores (every member's sequences), and the run's opening line."""
    c = run.config
    # The RM never computes vocabulary logits: drop the LM head's 6·D·V from the LM's count.
    flops_per_seq = (
        perf.train_flops_per_token(model.cfg, c.data.seq_len) - 6.0 * model.cfg.d_model * model.cfg.vocab_size
    ) * c.data.seq_len
    seqs = c.batch_size * K * (E or 1)  # scored sequences per step, every member's
    tail = LoopTail(
        run,
        start,
        "rm",
        tokens_per_step=seqs * c.data.seq_len,
        samples_per_step=seqs,
        flops_per_step=seqs * flops_per_seq,
        postfix={"loss": "rm/loss", "acc": "rm/accuracy"},
    )
    run.log(
        f"rm: {n_examples} comparisons (K={K}), steps {start}→{c.num_steps}, "
        f"{f'an ensemble of {E}, ' if E else ''}mesh {dict(run.mesh.shape)}, "
        f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params"
    )
    return tail
