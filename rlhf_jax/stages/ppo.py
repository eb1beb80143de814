"""Stage 4: PPO against a reward model with a per-token KL penalty to the frozen SFT policy.

One iteration (Ziegler et al. 2019, as in lm-human-preferences; InstructGPT §3.5):
  1. rollout  — sample a response per prompt with the KV cache (jitted), or
                rollout.samples_per_prompt of them;
  2. score    — policy log-probs and values, reference log-probs, and the score:
                a trained RM (normalised) or a Python reward function; with
                ppo.score_baseline="loo", minus the mean of its prompt's other samples;
  3. rewards  — r_t = −β·KL_t on each response token, + score on the last one;
  4. update   — E epochs × M minibatches of clipped PPO (advantages by GAE and
                whitened per minibatch, as lm-human-preferences), optional PPO-ptx;
  5. β        — the KL controller (fixed or adaptive) sees this batch's KL.
All of it runs as jitted functions over params sharded on the mesh.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import config as config_lib, optim, parallel, rl, train_state
from rlhf_jax.models.gpt import TransformerLM, positions_from_mask
from rlhf_jax.run import Run
from rlhf_jax.sampling import SamplingSettings, sample
from rlhf_jax.stages import ppo_setup


def response_stats(params, model, prompt, prompt_mask, response, response_mask, temperature):
    """Per response token [B, N]: log-prob (at the sampling temperature), entropy and value."""
    P = prompt.shape[1]
    tokens = jnp.concatenate([prompt, response], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    out = model.apply({"params": params}, tokens, positions_from_mask(mask), mask, heads=("lm", "value"))
    logits = out["logits"][:, P - 1:-1]  # position t-1 predicts response token t
    return {"logprobs": rl.logprobs_from_logits(logits, response, temperature),
            "entropy": rl.entropy_from_logits(logits, temperature),
            "values": out["values"][:, P - 1:-1]}


def values_of(params, model, batch, temperature):
    """Policy stats, with values from the separate critic when there is one."""
    stats = response_stats(params["policy"], model, batch["prompt"], batch["prompt_mask"], batch["response"],
                           batch["response_mask"], temperature)
    if "critic" in params:
        stats["values"] = response_stats(params["critic"], model, batch["prompt"], batch["prompt_mask"],
                                         batch["response"], batch["response_mask"], temperature)["values"]
    return stats


def ppo_loss(params, model, mb, ptx, c):
    """The PPO objective on one minibatch (Schulman et al. 2017 eq. 7 + clipped value loss)."""
    mask = mb["response_mask"].astype(jnp.float32)
    new = values_of(params, model, mb, c.rollout.temperature)
    rewards = mb["rewards"]
    if c.ppo.whiten_rewards:
        rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, mb["values"], mask, c.ppo.gamma, c.ppo.lam)
    advantages = jax.lax.stop_gradient(rl.masked_whiten(advantages, mask))
    pg_loss, pg = rl.policy_loss(new["logprobs"], mb["logprobs"], advantages, mask, c.ppo.clip_range)
    vf_loss, vf = rl.value_loss(new["values"], mb["values"], jax.lax.stop_gradient(returns), mask,
                                c.ppo.clip_range_value)
    entropy = rl.masked_mean(new["entropy"], mask)
    loss = pg_loss + c.ppo.vf_coef * vf_loss - c.ppo.entropy_coef * entropy
    stats = {"loss/policy_avg": pg_loss, "loss/value_avg": vf_loss, "policy/approxkl_avg": pg["approxkl"],
             "policy/clipfrac_avg": pg["clipfrac"], "val/clipfrac_avg": vf["clipfrac"], "val/ratio": pg["ratio_mean"],
             "policy/entropy_avg": entropy, "val/vpred": vf["vpred_mean"],
             "val/return": rl.masked_mean(returns, mask)}
    if ptx is not None:  # PPO-ptx (InstructGPT eq. 2): γ · pretraining log-likelihood
        from rlhf_jax.stages.lm import token_losses

        nll, tmask = token_losses(params["policy"], model, ptx)
        ptx_loss = jnp.sum(nll * tmask) / jnp.maximum(jnp.sum(tmask), 1.0)
        loss = loss + c.ppo.ptx_coef * ptx_loss
        stats["loss/ptx_avg"] = ptx_loss
    return loss, stats


def make_rollout_fn(model, c, tok):
    settings = SamplingSettings(max_new_tokens=c.rollout.max_new_tokens, temperature=c.rollout.temperature,
                                top_k=c.rollout.top_k, top_p=c.rollout.top_p, eos_id=ppo_setup.stop_id(c, tok),
                                pad_id=tok.pad_id, eos_after=c.rollout.eos_after)
    return functools.partial(sample, model=model, settings=settings)


def make_score_fn(model, c, rm):
    """(params, ref_params, rm_params, batch) → log-probs, ref log-probs, values, entropy, RM score."""

    def score(params, ref_params, rm_params, batch):
        out = values_of(params, model, batch, c.rollout.temperature)
        out["ref_logprobs"] = response_stats(ref_params, model, batch["prompt"], batch["prompt_mask"],
                                             batch["response"], batch["response_mask"],
                                             c.rollout.temperature)["logprobs"]
        if rm is not None:
            rm_model, norm = rm
            tokens = jnp.concatenate([batch["prompt"], batch["response"]], axis=1)
            mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1)
            from rlhf_jax.stages.rm import score_sequences

            out["scores"] = score_sequences(rm_params, rm_model, norm, tokens, mask)
        return out

    return score


def make_update_fn(model, tx, c):
    """(state, rollout, ptx) → (state, stats): E epochs × M minibatches, then the KL controller step."""
    E, M = c.ppo.epochs, c.ppo.num_minibatches

    def update(state: train_state.TrainState, rollout, ptx):
        B = rollout["response"].shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # A fresh permutation of the episodes every epoch, cut into M minibatches.
        order = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), B) for e in range(E)])
        order = order.reshape(E * M, B // M)
        grad_fn = jax.value_and_grad(ppo_loss, has_aux=True)
        if ptx is not None:  # one pretraining minibatch per update
            ptx = jax.tree.map(lambda x: x.reshape(E * M, -1, *x.shape[1:]), ptx)

        def one_minibatch(carry, xs):
            params, opt_state, nonfinite = carry
            idx, ptx_mb = xs
            mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
            (loss, stats), grads = grad_fn(params, model, mb, ptx_mb, c)
            stats["policy/grad_norm"] = optax.tree.norm(grads)
            carry = train_state.apply_if_finite(tx, grads, loss, params, opt_state, nonfinite, state.step,
                                                tuple(c.debug_nonfinite_steps))
            return carry, stats

        (params, opt_state, nonfinite), stats = jax.lax.scan(
            one_minibatch, (state.params, state.opt_state, state.nonfinite), (order, ptx))
        stats = jax.tree.map(jnp.mean, stats)  # *_avg: the mean over all E × M minibatches
        mask = rollout["response_mask"].astype(jnp.float32)
        mean_kl = jnp.mean(jnp.sum(rollout["kl"] * mask, axis=1))
        kl_state = rl.kl_controller_update({"kl_coef": state.extras["kl_coef"]}, mean_kl, B, c.kl.kind,
                                           c.kl.target, c.kl.horizon)
        # A non-finite rollout must not poison the controller for every later iteration.
        kl_coef = jnp.where(jnp.isfinite(kl_state["kl_coef"]), kl_state["kl_coef"], state.extras["kl_coef"])
        extras = {**state.extras, "kl_coef": kl_coef}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extras=extras,
                             nonfinite=nonfinite), stats

    return update


def rollout_metrics(r, kl_coef) -> dict[str, float]:
    mask = r["response_mask"].astype(np.float32)
    kl = np.sum(r["kl"] * mask, axis=1)
    return {"objective/kl": kl.mean(), "objective/scores": r["scores"].mean(),
            "objective/rlhf_reward": (r["scores"] - kl_coef * kl).mean(),
            "objective/non_score_reward": np.sum(r["non_score_reward"] * mask, axis=1).mean(),
            "objective/entropy": np.sum(r["entropy"] * mask, axis=1).mean(),
            "objective/response_length": mask.sum(1).mean(), "objective/ended_frac": r["ended"].mean(),
            "kl_coef": kl_coef}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    run = Run(config, workdir)
    c = run.config
    group = ppo_setup.check_batch(c)  # samples per prompt
    tok, prompts, ptx_source = ppo_setup.datasets(run)
    run.write_config()
    model = TransformerLM(config_lib.model_config(c))
    updates_per_iter = c.ppo.epochs * c.ppo.num_minibatches
    # optim.total_steps counts PPO iterations here (-1: num_steps); the lr anneals over every minibatch update.
    iterations = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
    tx, schedule = optim.make_optimizer(c.optim, iterations * updates_per_iter)

    init_params = ppo_setup.init_params_fn(model, c)
    state, shardings = train_state.create(init_params, tx, run.mesh, run.rules, c.seed,
                                          extras={"kl_coef": jnp.float32(c.kl.init_coef)})
    ref_params = ppo_setup.frozen_reference(run, model, state.params["policy"])
    state, meta = run.restore_or(state)
    if meta is None:
        state = state.replace(params=ppo_setup.initial_params(run, model, state.params))
    rm, rm_params, reward_fn = ppo_setup.reward(run, c)
    monitor_fn = ppo_setup.import_function(c.reward.monitor, "reward.monitor") if c.reward.monitor else None
    start = int(jax.device_get(state.step))

    rep = parallel.replicated(run.mesh)
    with parallel.activate(run.mesh, run.rules):
        rollout_fn = jax.jit(make_rollout_fn(model, c, tok))
        score_fn = jax.jit(make_score_fn(model, c, rm))
        reward_fn_jit = jax.jit(functools.partial(rl.compute_rewards, kl_kind=c.kl.estimator))
        update_fn = jax.jit(make_update_fn(model, tx, c), donate_argnums=(0,),
                            out_shardings=(shardings, rep))

    from rlhf_jax.data.loader import BatchLoader

    loader = BatchLoader(prompts, c.batch_size // group, seed=c.seed)
    ptx_loader = BatchLoader(ptx_source, c.ppo.ptx_batch_size * updates_per_iter, seed=c.seed + 1) \
        if ptx_source is not None else None
    writer = run.metric_writer(start)
    run.log(f"ppo: {loader.num_examples} prompts, {c.batch_size} episodes/iteration, "
            f"{updates_per_iter} updates/iteration, iterations {start}→{c.num_steps}")
    samples_path = os.path.join(run.workdir, "samples.jsonl")

    last = {}
    bar = run.progress(start, c.num_steps, "ppo")
    with parallel.activate(run.mesh, run.rules):
        for it in range(start, c.num_steps):
            t0 = time.perf_counter()
            local = loader.get_batch(it)  # each prompt `group` times in a row: the samples of one prompt
            batch = parallel.global_batch({"prompt": np.repeat(local["prompt_tokens"], group, axis=0),
                                           "prompt_mask": np.repeat(local["prompt_mask"], group, axis=0)},
                                          run.mesh, run.rules)
            keys = ppo_setup.sample_keys(c.seed, it, c.batch_size, run)
            gen = rollout_fn(state.params["policy"], batch["prompt"], batch["prompt_mask"], keys)
            batch.update(response=gen["tokens"], response_mask=gen["mask"])
            jax.block_until_ready(gen)
            t1 = time.perf_counter()

            scored = score_fn(state.params, ref_params, rm_params, batch)
            if reward_fn is not None:
                scored["scores"] = ppo_setup.function_scores(reward_fn, tok, batch, run)
            scores = scored["scores"]
            if c.ppo.missing_eos_penalty is not None:  # no stop token: a fixed penalty score (lm-human-preferences)
                scores = jnp.where(gen["ended"], scores, c.ppo.missing_eos_penalty)
            if c.ppo.score_clip > 0:
                scores = jnp.clip(scores, -c.ppo.score_clip, c.ppo.score_clip)
            # The RM score PPO maximises; objective/scores logs the raw one.
            centred = rl.leave_one_out_scores(scores, group) if c.ppo.score_baseline == "loo" else scores
            kl_coef = float(jax.device_get(state.extras["kl_coef"]))  # read before `state` is donated
            rewards, kl, non_score = reward_fn_jit(centred, scored["logprobs"], scored["ref_logprobs"],
                                                   batch["response_mask"], kl_coef)
            rollout = {**batch, "logprobs": scored["logprobs"], "values": scored["values"], "rewards": rewards,
                       "kl": kl}
            jax.block_until_ready(rollout)
            t2 = time.perf_counter()

            ptx = ppo_setup.ptx_batches(ptx_loader, it, updates_per_iter, run)
            host = jax.tree.map(parallel.to_host, {"kl": kl, "scores": scores, "non_score_reward": non_score,
                                                  "entropy": scored["entropy"], "response_mask": batch["response_mask"],
                                                  "ended": gen["ended"]})  # all processes' episodes
            if it == start:
                update_fn = run.compile("ppo update", update_fn, state, rollout, ptx)
            state, stats = update_fn(state, rollout, ptx)
            stats = jax.device_get(stats)
            run.check_finite(state)
            t3 = time.perf_counter()
            if monitor_fn is not None:  # e.g. the gold judge, to watch RM over-optimisation (Gao et al. 2022)
                stats["objective/monitor_score"] = float(np.mean(parallel.to_host(
                    ppo_setup.function_scores(monitor_fn, tok, batch, run))))

            done = it + 1
            bar.update(1)
            gen_tokens = float(host["response_mask"].sum())
            m = {**rollout_metrics(host, kl_coef), **stats,
                 "lr": float(schedule(it * updates_per_iter)),
                 "perf/rollout_tokens_per_sec": gen_tokens / (t1 - t0), "perf/episodes_per_sec": c.batch_size / (t3 - t0),
                 "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
                 "time/generate_frac": (t1 - t0) / (t3 - t0)}
            if done % c.log_every == 0 or done == c.num_steps or done == start + 1:
                last = writer.write(done, m)
                bar.set_postfix(score=f"{m['objective/scores']:.3f}", kl=f"{m['objective/kl']:.3f}")
            if c.sample_every and (done % c.sample_every == 0 or done == c.num_steps):
                ppo_setup.write_samples(samples_path, writer, done, tok, batch, host["scores"], run)
            if done % c.checkpoint.every == 0 or done == c.num_steps or run.preempted:
                run.save(state, {"stage": "ppo", "data_step": done}, force=run.preempted)
            if run.preempted:
                run.log(f"SIGTERM: saved iteration {done}; rerun the same command to resume.")
                break
    bar.close()
    writer.close()
    run.close()
    return last
