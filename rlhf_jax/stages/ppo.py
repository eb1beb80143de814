"""Stage 4: the policy-gradient family against a reward, KL-regularised to the frozen SFT policy.

One loop for PPO (Ziegler et al. 2019 as lm-human-preferences does it; InstructGPT §3.5), GRPO
(DeepSeekMath), Dr. GRPO, RLOO and REINFORCE++: they differ only in the pieces `rl.py` names and
config switches pick (configs/ppo.py, grpo.py, rloo.py). One iteration:
  1. rollout  — sample rollout.samples_per_prompt responses per prompt with the KV cache (jitted);
  2. score    — policy log-probs (and the critic's values, for GAE), reference log-probs, and the
                score: a trained RM (normalised) or a Python reward function;
  3. advantage — shaped scores (rl.shape_scores) → per-token rewards (−β·KL_t in them when
                kl.placement="reward") → advantages (ppo.advantage: gae | grpo | dr_grpo | rloo |
                reinforce_pp), all in one jitted function;
  4. update   — E epochs × M minibatches of the clipped surrogate (reduced by ppo.loss_aggregation),
                + the clipped value loss with a critic, + β·KL when kl.placement="loss", optional PPO-ptx;
  5. β        — the KL controller (fixed or adaptive) sees this batch's KL.
All of it runs as jitted functions over params sharded on the mesh.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import config as config_lib, forward, lora, optim, parallel, rl, rollout as rollouts, train_state
from rlhf_jax.loop import LoopTail
from rlhf_jax.models.gpt import TransformerLM
from rlhf_jax.run import Run
from rlhf_jax import ppo_setup


def policy_stats(params, model, batch, temperature, critic: bool):
    """Per response token [B, N]: the policy's log-probs and entropy, and with a critic its values (the
    policy's own value head, or the separate critic's when params has one)."""
    args = (batch["prompt"], batch["prompt_mask"], batch["response"], batch["response_mask"], temperature)
    stats = forward.response_stats(params["policy"], model, *args, values=critic and "critic" not in params)
    if critic and "critic" in params:
        stats["values"] = forward.response_stats(params["critic"], model, *args, values=True)["values"]
    return stats


def pg_loss(params, model, mb, ptx, kl_coef, c):
    """The family's objective on one minibatch: clipped surrogate (Schulman et al. 2017 eq. 7), + the clipped
    value loss with a critic, + β·KL with kl.placement="loss" (DeepSeekMath eq. 3), − entropy bonus, + PPO-ptx."""
    mask = mb["response_mask"].astype(jnp.float32)
    critic, agg = c.ppo.advantage == "gae", c.ppo.loss_aggregation
    new = policy_stats(params, model, mb, c.rollout.temperature, critic)
    advantages = mb["advantages"]
    if c.ppo.whiten_advantages:  # per minibatch, as lm-human-preferences
        advantages = rl.masked_whiten(advantages, mask)
    loss, pg = rl.policy_loss(new["logprobs"], mb["logprobs"], jax.lax.stop_gradient(advantages), mask,
                              c.ppo.clip_range, agg)
    entropy = rl.masked_mean(new["entropy"], mask)
    stats = {"loss/policy_avg": loss, "policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"],
             "val/ratio": pg["ratio_mean"], "policy/entropy_avg": entropy,
             # the first minibatch's is the trainer's own recomputation gap (0 up to float noise)
             "policy/logprob_change": rl.masked_mean(jnp.abs(new["logprobs"] - mb["logprobs"]), mask)}
    if critic:
        vf_loss, vf = rl.value_loss(new["values"], mb["values"], jax.lax.stop_gradient(mb["returns"]), mask,
                                    c.ppo.clip_range_value)
        loss = loss + c.ppo.vf_coef * vf_loss
        stats.update({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf["clipfrac"], "val/vpred": vf["vpred_mean"],
                      "val/return": rl.masked_mean(mb["returns"], mask)})
    if c.kl.placement == "loss":
        kl = rl.kl_loss(new["logprobs"], mb["ref_logprobs"], mask, c.kl.estimator, agg)
        loss = loss + kl_coef * kl
        stats["loss/kl_avg"] = kl
    loss = loss - c.ppo.entropy_coef * entropy
    if ptx is not None:  # PPO-ptx (InstructGPT eq. 2): γ · pretraining log-likelihood
        nll_sum, n = forward.summed_token_nll(params["policy"], model, ptx)
        ptx_loss = nll_sum / jnp.maximum(n, 1.0)
        loss = loss + c.ppo.ptx_coef * ptx_loss
        stats["loss/ptx_avg"] = ptx_loss
    return loss, stats


def make_score_fn(model, c, rm):
    """(params, ref_params, rm_params, batch) → log-probs, entropy, [values], ref log-probs, [RM score];
    ref_params None: the policy with its LoRA adapters off."""

    rm_score = None if rm is None else rollouts.rm_score_fn(rm, c)

    def score(params, ref_params, rm_params, batch):
        out = policy_stats(params, model, batch, c.rollout.temperature, c.ppo.advantage == "gae")
        ref = lora.reference(params["policy"], ref_params)
        out["ref_logprobs"] = forward.response_stats(ref, model, batch["prompt"], batch["prompt_mask"],
                                                        batch["response"], batch["response_mask"],
                                                        c.rollout.temperature)["logprobs"]
        if rm is not None:
            out["scores"], out["rm_mean"], out["rm_std"] = rm_score(rm_params, *rollouts.joined(batch))
        return out

    return score


def make_advantage_fn(c, group: int):
    """(raw scores [B], ended [B], scored, sampler log-probs [B, N], mask [B, N], β) → the rollout's
    scores, rewards, KL, advantages (and the critic's returns), with the sampler/trainer log-prob gap."""

    def advantage(raw_scores, ended, scored, sampler_logprobs, mask, kl_coef):
        scores, shaped = rl.shape_scores(raw_scores, ended, c.ppo.missing_eos_penalty, c.ppo.score_clip,
                                         c.ppo.score_baseline, group)
        beta_in_reward = kl_coef if c.kl.placement == "reward" else 0.0
        rewards, kl, non_score = rl.compute_rewards(shaped, scored["logprobs"], scored["ref_logprobs"], mask,
                                                    beta_in_reward, c.kl.estimator)
        if c.ppo.whiten_rewards:
            rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = rl.advantages(c.ppo.advantage, rewards, mask, scored.get("values"), group, c.ppo.gamma,
                                     c.ppo.lam)
        gap = jnp.where(mask != 0, scored["logprobs"] - sampler_logprobs, 0.0)
        out = {"scores": scores, "rewards": rewards, "kl": kl, "non_score_reward": non_score, "advantages": adv,
               "sampler/logprob_gap_mean": rl.masked_mean(gap, mask),
               "sampler/logprob_gap_absmax": jnp.max(jnp.abs(gap))}
        if returns is not None:
            out["returns"] = returns
        return out

    return advantage


def make_update_fn(model, tx, c):
    """(state, rollout, ptx) → (state, stats): E epochs × M minibatches, then the KL controller step."""
    E, M = c.ppo.epochs, c.ppo.num_minibatches

    def update(state: train_state.TrainState, rollout, ptx):
        B = rollout["response"].shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        # A fresh permutation of the episodes every epoch, cut into M minibatches.
        order = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), B) for e in range(E)])
        order = order.reshape(E * M, B // M)
        grad_fn = jax.value_and_grad(pg_loss, has_aux=True)
        kl_coef = state.extras["kl_coef"]
        if ptx is not None:  # one pretraining minibatch per update
            ptx = jax.tree.map(lambda x: x.reshape(E * M, -1, *x.shape[1:]), ptx)

        def one_minibatch(carry, xs):
            params, opt_state, nonfinite = carry
            idx, ptx_mb = xs
            mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
            (loss, stats), grads = grad_fn(params, model, mb, ptx_mb, kl_coef, c)
            stats["policy/grad_norm"] = optax.tree.norm(grads)
            carry = train_state.apply_if_finite(tx, grads, loss, params, opt_state, nonfinite, state.step,
                                                tuple(c.debug_nonfinite_steps))
            return carry, stats

        (params, opt_state, nonfinite), stats = jax.lax.scan(
            one_minibatch, (state.params, state.opt_state, state.nonfinite), (order, ptx))
        first_change = stats["policy/logprob_change"][0]
        stats = jax.tree.map(jnp.mean, stats)  # *_avg: the mean over all E × M minibatches
        stats["policy/logprob_change_first_minibatch"] = first_change
        mask = rollout["response_mask"].astype(jnp.float32)
        mean_kl = jnp.mean(jnp.sum(rollout["kl"] * mask, axis=1))
        kl_state = rl.kl_controller_update({"kl_coef": kl_coef}, mean_kl, B, c.kl.kind, c.kl.target, c.kl.horizon)
        # A non-finite rollout must not poison the controller for every later iteration.
        new_coef = jnp.where(jnp.isfinite(kl_state["kl_coef"]), kl_state["kl_coef"], kl_coef)
        extras = {**state.extras, "kl_coef": new_coef}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extras=extras,
                             nonfinite=nonfinite), stats

    return update


def jit_functions(model, tx, c, tok, rm, group: int, shardings, mesh, rules):
    """The iteration's jitted functions (rollout, score, advantage, update; the update donates the state).
    rlhf_jax/plan.py compiles these same functions from shapes."""
    with parallel.activate(mesh, rules):
        return (jax.jit(rollouts.make_rollout_fn(model, c, tok)), jax.jit(make_score_fn(model, c, rm)),
                jax.jit(make_advantage_fn(c, group)),
                jax.jit(make_update_fn(model, tx, c), donate_argnums=(0,),
                        out_shardings=(shardings, parallel.replicated(mesh))))


def rollout_metrics(r, kl_coef) -> dict[str, float]:
    mask = r["response_mask"].astype(np.float32)
    kl = np.sum(r["kl"] * mask, axis=1)
    return {"objective/kl": kl.mean(), "objective/scores": r["scores"].mean(),
            "objective/rlhf_reward": (r["scores"] - kl_coef * kl).mean(),
            "objective/non_score_reward": np.sum(r["non_score_reward"] * mask, axis=1).mean(),
            "objective/entropy": np.sum(r["entropy"] * mask, axis=1).mean(),
            "objective/response_length": mask.sum(1).mean(), "objective/ended_frac": r["ended"].mean(),
            "sampler/logprob_gap_mean": float(r["sampler/logprob_gap_mean"]),
            "sampler/logprob_gap_absmax": float(r["sampler/logprob_gap_absmax"]), "kl_coef": kl_coef}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    run = Run(config, workdir)
    c = run.config
    group = ppo_setup.check_config(c)  # samples per prompt
    tok, prompts = rollouts.prompt_data(run)
    ptx_source = ppo_setup.ptx_data(run, tok)
    run.write_config()
    model = TransformerLM(config_lib.model_config(c))
    updates_per_iter = c.ppo.epochs * c.ppo.num_minibatches
    # optim.total_steps counts iterations here (-1: num_steps); the lr anneals over every minibatch update.
    iterations = c.optim.total_steps if c.optim.total_steps > 0 else c.num_steps
    tx, schedule = optim.make_optimizer(c.optim, iterations * updates_per_iter)
    tx = lora.optimizer(tx, model.cfg)  # with LoRA on: the adapters and the value head only

    init_params = ppo_setup.init_params_fn(model, c)
    state, shardings = train_state.create(init_params, tx, run.mesh, run.rules, c.seed,
                                          extras={"kl_coef": jnp.float32(c.kl.init_coef)})
    policy_heads = tuple(state.params["policy"])
    # With LoRA the reference is the policy with its adapters off (lora.reference): no copy.
    ref_params = None if c.model.lora.rank else run.frozen_init_params(state.params["policy"], heads=policy_heads)
    state, meta = run.restore_or(state)
    if meta is None:
        state = state.replace(params=ppo_setup.initial_params(run, model, state.params))
    rm, rm_params, reward_fn = rollouts.reward(run, c)
    monitor_fn = rollouts.import_function(c.reward.monitor, "reward.monitor") if c.reward.monitor else None
    start = int(jax.device_get(state.step))

    rollout_fn, score_fn, advantage_fn, update_fn = jit_functions(model, tx, c, tok, rm, group, shardings, run.mesh,
                                                                  run.rules)

    from rlhf_jax.data.loader import BatchLoader

    loader = BatchLoader(prompts, c.batch_size // group, seed=c.seed)
    ptx_loader = BatchLoader(ptx_source, c.ppo.ptx_batch_size * updates_per_iter, seed=c.seed + 1) \
        if ptx_source is not None else None
    tail = LoopTail(run, start, c.stage, postfix={"score": "objective/scores", "kl": "objective/kl"})
    run.log(f"{c.stage} ({c.ppo.advantage} advantages, KL {c.kl.estimator} in the {c.kl.placement}): "
            f"{loader.num_examples} prompts, {c.batch_size} episodes/iteration ({group} per prompt), "
            f"{updates_per_iter} updates/iteration, iterations {start}→{c.num_steps}")
    samples_path = os.path.join(run.workdir, "samples.jsonl")

    with parallel.activate(run.mesh, run.rules):
        for it in range(start, c.num_steps):
            t0 = time.perf_counter()
            batch = rollouts.prompt_batch(loader, it, group, run)  # each prompt `group` times in a row
            keys = rollouts.sample_keys(c.seed, it, c.batch_size, run)
            gen = rollout_fn(state.params["policy"], batch["prompt"], batch["prompt_mask"], keys)
            batch.update(response=gen["tokens"], response_mask=gen["mask"])
            jax.block_until_ready(gen)
            t1 = time.perf_counter()

            scored = score_fn(state.params, ref_params, rm_params, batch)
            raw_scores = scored.pop("scores") if reward_fn is None else \
                rollouts.function_scores(reward_fn, tok, batch, run)
            members = {k: scored.pop(k) for k in ("rm_mean", "rm_std") if k in scored}
            kl_coef = float(jax.device_get(state.extras["kl_coef"]))  # read before `state` is donated
            adv = advantage_fn(raw_scores, gen["ended"], scored, gen["logprobs"], batch["response_mask"], kl_coef)
            rollout = {**batch, "logprobs": scored["logprobs"], "ref_logprobs": scored["ref_logprobs"],
                       **{k: adv[k] for k in ("rewards", "kl", "advantages", "returns") if k in adv}}
            if "values" in scored:
                rollout["values"] = scored["values"]
            jax.block_until_ready(rollout)
            t2 = time.perf_counter()

            ptx = ppo_setup.ptx_batches(ptx_loader, it, updates_per_iter, run)
            host = jax.tree.map(parallel.to_host, {  # all processes' episodes
                "response_mask": batch["response_mask"], "ended": gen["ended"], "entropy": scored["entropy"],
                **{k: adv[k] for k in ("kl", "scores", "non_score_reward", "sampler/logprob_gap_mean",
                                       "sampler/logprob_gap_absmax")}})
            update_fn = tail.compile_once(f"{c.stage} update", update_fn, state, rollout, ptx)
            state, stats = update_fn(state, rollout, ptx)
            stats = jax.device_get(stats)
            t3 = time.perf_counter()
            if monitor_fn is not None:  # e.g. the gold judge, to watch RM over-optimisation (Gao et al. 2022)
                stats["objective/monitor_score"] = float(np.mean(parallel.to_host(
                    rollouts.function_scores(monitor_fn, tok, batch, run))))

            # The RM's members' mean and spread (an ensemble's: what lcb / min trade off; one RM's: its score, 0)
            stats.update({f"objective/{k}": float(np.mean(parallel.to_host(v))) for k, v in members.items()})
            done = it + 1
            gen_tokens = float(host["response_mask"].sum())
            m = {**rollout_metrics(host, kl_coef), **stats,
                 "lr": float(schedule(it * updates_per_iter)),
                 "perf/rollout_tokens_per_sec": gen_tokens / (t1 - t0), "perf/episodes_per_sec": c.batch_size / (t3 - t0),
                 "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
                 "time/generate_frac": (t1 - t0) / (t3 - t0)}
            if c.sample_every and (done % c.sample_every == 0 or done == c.num_steps):
                rollouts.write_samples(samples_path, tail.writer, done, tok, batch, host["scores"], run)
            if tail.end_step(done, state, m):
                break
    return tail.close()
