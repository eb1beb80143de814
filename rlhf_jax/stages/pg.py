"""Stage 4 (`pg`): the policy-gradient family against a reward, KL-regularised to the frozen SFT policy.

One loop, one stage and one config block (config.pg) for PPO (Ziegler et al. 2019 as lm-human-preferences
does it; InstructGPT §3.5), GRPO (DeepSeekMath), Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO and CISPO: they
differ only in the pieces `rl.py` names and config switches pick (configs/ppo.py, grpo.py, dapo.py, ...). One
iteration is one path, one record (rollout.Rollout) passed along it, each step a jitted function:
  1. generate   — sample rollout.samples_per_prompt responses per prompt with the KV cache (with
                  pg.dynamic_sampling, DAPO's: more draws until the batch is groups whose scores differ,
                  rlhf_jax/dynamic_sampling.py);
  2. score      — the policy's log-probs (and the critic's values, for GAE), the reference's log-probs, and
                  the reward source's score (rewards.py: a trained RM, an RM ensemble, or a Python function);
  3. advantages — shaped scores (rl.shape_scores) → per-token rewards (−β·KL_t in them when
                  kl.placement="reward") → advantages (pg.advantage: gae | grpo | dr_grpo | rloo |
                  reinforce_pp);
  4. update     — E epochs × M minibatches of the clipped surrogate (reduced by pg.loss_aggregation),
                  + the clipped value loss with a critic, + β·KL when kl.placement="loss", optional PPO-ptx;
                  then the KL controller (fixed or adaptive) sees this batch's KL. β lives in the train state.
Beside the path, not in it: the sampler/trainer log-prob gap (sampler_gap) and the metrics.
All of it runs as jitted functions over params sharded on the mesh.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import (
    dynamic_sampling,
    forward,
    lora,
    parallel,
    perf,
    pg_setup,
    rewards,
    rl,
    rollout as rollouts,
    train_state,
)
from rlhf_jax.loop import LoopTail
from rlhf_jax.rollout import Rollout
from rlhf_jax.run import Run


def policy_stats(params, model, rollout: Rollout, temperature, critic: bool):
    """Per response token [B, N]: the policy's log-probs and entropy, and with a critic its values (the
    policy's own value head, or the separate critic's when params has one)."""
    args = (rollout.prompt, rollout.prompt_mask, rollout.response, rollout.response_mask, temperature)
    stats = forward.response_stats(params["policy"], model, *args, values=critic and "critic" not in params)
    if critic and "critic" in params:
        stats["values"] = forward.response_stats(params["critic"], model, *args, values=True)["values"]
    return stats


def old_policy_is_current(c) -> bool:
    """Whether π_old is π_θ itself when the update runs: one update per batch (GRPO's setting, DeepSeekMath
    §4.1.1) and nothing else that needs π_old's log-probs before it (no critic, the KL in the loss). Then the
    score step skips the policy's forward pass, the clipped surrogate's ratio is exactly 1 (π_old's log-probs
    are π_θ's own, gradient stopped), and its gradient is the plain policy gradient."""
    return c.pg.epochs * c.pg.num_minibatches == 1 and c.pg.advantage != "gae" and c.kl.placement == "loss"


def pg_loss(params, model, mb: Rollout, ptx, kl_coef, c):
    """The family's objective on one minibatch: clipped surrogate (Schulman et al. 2017 eq. 7), + the clipped
    value loss with a critic, + β·KL with kl.placement="loss" (DeepSeekMath eq. 3), − entropy bonus, + PPO-ptx."""
    mask = mb.response_mask.astype(jnp.float32)
    critic, agg = c.pg.advantage == "gae", c.pg.loss_aggregation
    new = policy_stats(params, model, mb, c.rollout.temperature, critic)
    old = jax.lax.stop_gradient(new["logprobs"]) if old_policy_is_current(c) else mb.logprobs
    advantages = mb.advantages
    if c.pg.whiten_advantages:  # per minibatch, as lm-human-preferences
        advantages = rl.masked_whiten(advantages, mask)
    # the sampler's distribution vs π_old's: measured always, applied with pg.rollout_correction = tis | mis
    weights, gap = rl.rollout_correction(
        old, mb.sampler_logprobs, mask, c.pg.rollout_correction, c.pg.correction_level, c.pg.correction_cap
    )
    advantages = advantages * weights
    # token_sum's constant: the response budget, whatever width this rollout was cut to (rollout.length_bucket)
    budget = c.rollout.max_new_tokens
    loss_fn = rl.POLICY_LOSSES[c.pg.policy_loss]  # ppo_clip unless config.pg.policy_loss names another
    loss, pg = loss_fn(new["logprobs"], old, jax.lax.stop_gradient(advantages), mask, rl.LossSettings.of(c.pg, budget))
    entropy = rl.masked_mean(new["entropy"], mask)
    stats = {
        "loss/policy_avg": loss,
        "policy/approxkl_avg": pg["approxkl"],
        "policy/clipfrac_avg": pg["clipfrac"],
        "policy/ratio": pg["ratio_mean"],
        "policy/entropy_avg": entropy,
        # the first minibatch's is the trainer's own recomputation gap (0 up to float noise); when the score step
        # skips the policy (old_policy_is_current), mb.logprobs are the sampler's: then it is the sampler's gap
        "policy/logprob_change": rl.masked_mean(jnp.abs(new["logprobs"] - mb.logprobs), mask),
        **{f"sampler/{k}": v for k, v in gap.items()},
    }
    if critic:
        vf_loss, vf = rl.value_loss(
            new["values"], mb.values, jax.lax.stop_gradient(mb.returns), mask, c.pg.clip_range_value
        )
        loss = loss + c.pg.vf_coef * vf_loss
        stats.update(
            {
                "loss/value_avg": vf_loss,
                "val/clipfrac_avg": vf["clipfrac"],
                "val/vpred": vf["vpred_mean"],
                "val/return": rl.masked_mean(mb.returns, mask),
            }
        )
    if c.kl.placement == "loss":
        kl = rl.kl_loss(new["logprobs"], mb.ref_logprobs, mask, c.kl.estimator, agg, budget)
        loss = loss + kl_coef * kl
        stats["loss/kl_avg"] = kl
    if c.pg.entropy_coef:  # else the entropy is a metric only: no backward pass through it over the vocabulary
        loss = loss - c.pg.entropy_coef * entropy
    if ptx is not None:  # PPO-ptx (InstructGPT eq. 2): γ · pretraining log-likelihood
        nll_sum, n = forward.summed_token_nll(params["policy"], model, ptx)
        ptx_loss = nll_sum / jnp.maximum(n, 1.0)
        loss = loss + c.pg.ptx_coef * ptx_loss
        stats["loss/ptx_avg"] = ptx_loss
    return loss, stats


def make_score_fn(model, c, reward: rewards.RewardSource):
    """(params, ref_params, reward_params, rollout, from_host) → the rollout with the policy's log-probs and
    entropy, the critic's values (GAE), the reference's log-probs and the reward; ref_params None: the policy
    with its LoRA adapters off. from_host: reward.on_host(rollout)."""
    critic = c.pg.advantage == "gae"

    def score(params, ref_params, reward_params, rollout: Rollout, from_host) -> Rollout:
        if old_policy_is_current(c):  # the update's own forward pass gives π_old: the sampler's log-probs stand in
            stats = {"logprobs": rollout.sampler_logprobs, "entropy": None}  # for the KL metric until then
        else:
            stats = policy_stats(params, model, rollout, c.rollout.temperature, critic)
        ref = forward.response_stats(
            lora.reference(params["policy"], ref_params),
            model,
            rollout.prompt,
            rollout.prompt_mask,
            rollout.response,
            rollout.response_mask,
            c.rollout.temperature,
        )["logprobs"]
        return rollout.replace(
            logprobs=stats["logprobs"],
            entropy=stats["entropy"],
            values=stats.get("values"),
            ref_logprobs=ref,
            reward=reward.on_device(reward_params, rollout, from_host),
        )

    return score


def make_advantage_fn(c, group: int):
    """(rollout, β) → the rollout with its judged scores, per-token rewards, KL, advantages (and the critic's
    returns)."""

    def advantages(rollout: Rollout, kl_coef) -> Rollout:
        mask = rollout.response_mask
        # DAPO's overlong shaping (pg.overlong_cache > 0) adds a length reward before the rest of the shaping
        lengths = jnp.sum(rollout.response_mask, axis=1)
        raw = rollout.reward.score + rl.overlong_penalty(lengths, c.rollout.max_new_tokens, c.pg.overlong_cache)
        scores, shaped = rl.shape_scores(
            raw, rollout.ended, c.pg.missing_eos_penalty, c.pg.score_clip, c.pg.score_baseline, group
        )
        beta_in_reward = kl_coef if c.kl.placement == "reward" else 0.0
        token_rewards, kl, non_score = rl.compute_rewards(
            shaped, rollout.logprobs, rollout.ref_logprobs, mask, beta_in_reward, c.kl.estimator
        )
        if c.pg.whiten_rewards:
            token_rewards = rl.masked_whiten(token_rewards, mask, shift_mean=False)
        adv, returns = rl.advantages(c.pg.advantage, token_rewards, mask, rollout.values, group, c.pg.gamma, c.pg.lam)
        return rollout.replace(
            scores=scores, rewards=token_rewards, kl=kl, non_score_reward=non_score, advantages=adv, returns=returns
        )

    return advantages


def make_update_fn(model, tx, c):
    """(state, rollout, ptx) → (state, stats): E epochs × M minibatches, then the KL controller step; stats
    include the β this rollout's rewards and loss used (kl_coef)."""
    E, M = c.pg.epochs, c.pg.num_minibatches

    def update(state: train_state.TrainState, rollout: Rollout, ptx):
        B = rollout.response.shape[0]
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
            carry = train_state.apply_if_finite(
                tx, grads, loss, params, opt_state, nonfinite, state.step, tuple(c.debug_nonfinite_steps)
            )
            return carry, stats

        (params, opt_state, nonfinite), stats = jax.lax.scan(
            one_minibatch, (state.params, state.opt_state, state.nonfinite), (order, ptx)
        )
        first_change = stats["policy/logprob_change"][0]
        stats = jax.tree.map(jnp.mean, stats)  # *_avg: the mean over all E × M minibatches
        stats.update({"policy/logprob_change_first_minibatch": first_change, "kl_coef": kl_coef})
        mask = rollout.response_mask.astype(jnp.float32)
        mean_kl = jnp.mean(jnp.sum(rollout.kl * mask, axis=1))
        kl_state = rl.kl_controller_update(state.extras, mean_kl, B, c.kl.kind, c.kl.target, c.kl.horizon)
        # A non-finite rollout must not poison the controller for every later iteration.
        new_coef = jnp.where(jnp.isfinite(kl_state["kl_coef"]), kl_state["kl_coef"], kl_coef)
        extras = {**state.extras, "kl_coef": new_coef}
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, extras=extras, nonfinite=nonfinite
        ), stats

    return update


def sampler_gap(rollout: Rollout) -> dict:
    """The trainer's log-prob of each drawn token (full forward) minus the sampler's (KV cache), over the real
    tokens: its mean and its largest magnitude, nats. Zero but for rounding: a diagnostic, not an input."""
    mask = rollout.response_mask
    gap = jnp.where(mask != 0, rollout.logprobs - rollout.sampler_logprobs, 0.0)
    return {"sampler/logprob_gap_mean": rl.masked_mean(gap, mask), "sampler/logprob_gap_absmax": jnp.max(jnp.abs(gap))}


class Steps(NamedTuple):
    """The iteration's jitted functions, in the order they run."""

    generate: Callable  # (policy params, prompt, prompt_mask, keys) → Rollout
    score: Callable  # (params, ref_params, reward params, rollout, reward.on_host(rollout)) → Rollout
    advantages: Callable  # (rollout, β) → Rollout
    update: Callable  # (state, rollout, ptx) → (state, stats); donates the state


def jit_functions(model, tx, c, tok, reward: rewards.RewardSource, group: int, shardings, mesh, rules) -> Steps:
    """The iteration's jitted functions. rlhf_jax/plan.py compiles these same functions from shapes."""
    with parallel.activate(mesh, rules):
        return Steps(
            jax.jit(rollouts.make_rollout_fn(model, c, tok)),
            jax.jit(make_score_fn(model, c, reward)),
            jax.jit(make_advantage_fn(c, group)),
            jax.jit(
                make_update_fn(model, tx, c), donate_argnums=(0,), out_shardings=(shardings, parallel.replicated(mesh))
            ),
        )


HOST_FIELDS = ("response_mask", "ended", "entropy", "kl", "scores", "non_score_reward")  # what the metrics read


def rollout_metrics(host: dict, kl_coef) -> dict[str, float]:
    """objective/*: the rollout's episodes (every process's; HOST_FIELDS as numpy), sums over tokens and
    means over episodes; rlhf_reward = score − β·KL."""
    mask = host["response_mask"].astype(np.float32)
    kl = np.sum(host["kl"] * mask, axis=1)
    return {
        "objective/kl": kl.mean(),
        "objective/scores": host["scores"].mean(),
        "objective/rlhf_reward": (host["scores"] - kl_coef * kl).mean(),
        "objective/non_score_reward": np.sum(host["non_score_reward"] * mask, axis=1).mean(),
        # the policy's entropy when the score step ran its forward pass (else the update's policy/entropy_avg)
        **({"objective/entropy": np.sum(host["entropy"] * mask, axis=1).mean()} if "entropy" in host else {}),
        "objective/response_length": mask.sum(1).mean(),
        "objective/ended_frac": host["ended"].mean(),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    run = Run(config, workdir)
    c = run.config
    group = pg_setup.check_config(c)  # samples per prompt
    tok, prompts, columns = rollouts.prompt_data(run)
    ptx_source = pg_setup.ptx_data(run, tok)
    updates_per_iter = c.pg.epochs * c.pg.num_minibatches
    # optim.total_steps counts iterations here (-1: num_steps); the lr anneals over every minibatch update.
    model, tx, schedule, state, shardings = run.setup_state(
        lambda model: pg_setup.init_params_fn(model, c),
        updates_per_step=updates_per_iter,
        extras=rl.kl_controller_init(c.kl.init_coef),
        start=lambda like: pg_setup.initial_params(run, like),
    )
    policy_heads = tuple(state.params["policy"])
    # With LoRA the reference is the policy with its adapters off (lora.reference): no copy.
    ref_params = None if c.model.lora.rank else run.frozen_init_params(state.params, heads=policy_heads, under="policy")
    state, meta = run.restore_or(state)
    reward = rewards.source(run, c, tok, columns)
    start = int(jax.device_get(state.step))
    steps = jit_functions(model, tx, c, tok, reward, group, shardings, run.mesh, run.rules)
    monitor = rewards.monitor(run, c, tok, columns)
    return loop(run, state, steps, ref_params, (reward, monitor), tok, prompts, ptx_source, schedule, group, start)


def loop(
    run: Run, state, steps: Steps, ref_params, reward, tok, prompts, ptx_source, schedule, group: int, start: int
) -> dict[str, float]:
    """Iterations start → num_steps, each one path: generate → score → advantages → update, then its metrics.
    reward: (the reward source, the monitor or None)."""
    from rlhf_jax.data.loader import BatchLoader

    c = run.config
    reward, monitor = reward
    updates_per_iter = c.pg.epochs * c.pg.num_minibatches
    loader = BatchLoader(prompts, c.batch_size // group, seed=c.seed)
    # prompt batches (and sample keys) per iteration: pg.dynamic_sampling_max_draws with dynamic sampling, each
    # iteration's its own, so a resumed run draws what an uninterrupted one does
    draws = c.pg.dynamic_sampling_max_draws if c.pg.dynamic_sampling else 1
    ptx_loader = (
        BatchLoader(ptx_source, c.pg.ptx_batch_size * updates_per_iter, seed=c.seed + 1)
        if ptx_source is not None
        else None
    )
    gap_fn = jax.jit(sampler_gap)
    tail = LoopTail(run, start, c.stage, postfix={"score": "objective/scores", "kl": "objective/kl"})
    run.log(
        f"{c.stage} ({c.pg.advantage} advantages, KL {c.kl.estimator} in the {c.kl.placement}): "
        f"{loader.num_examples} prompts, {c.batch_size} episodes/iteration ({group} per prompt), "
        f"{updates_per_iter} updates/iteration, iterations {start}→{c.num_steps}"
    )
    with parallel.activate(run.mesh, run.rules):
        for it in range(start, c.num_steps):
            t0 = time.perf_counter()
            clock = {"generate_s": 0.0, "tokens": 0}
            draw = functools.partial(
                draw_rollout, run, steps, state, ref_params, reward, loader, group, clock, it * draws
            )
            if c.pg.dynamic_sampling:  # DAPO: only groups whose scores differ, as many draws as that takes
                judge = functools.partial(steps.advantages, kl_coef=state.extras["kl_coef"])
                rollout, sampling = dynamic_sampling.fill_batch(draw, judge, group, draws, tok.pad_id)
            else:
                rollout, sampling = draw(0), {}
            rollout = jax.block_until_ready(steps.advantages(rollout, state.extras["kl_coef"]))
            t2 = time.perf_counter()

            ptx = pg_setup.ptx_batches(ptx_loader, it, run)
            host = {  # all processes' episodes
                k: parallel.to_host(getattr(rollout, k)) for k in HOST_FIELDS if getattr(rollout, k) is not None
            }
            update = tail.compiled_for(f"{c.stage} update", steps.update, state, rollout, ptx)
            state, stats = update(state, rollout, ptx)
            stats = jax.device_get(stats)
            if not old_policy_is_current(c):  # else the update's first minibatch measured it: logprob_change
                stats.update({k: parallel.to_host(v) for k, v in gap_fn(rollout).items()})
            t3 = time.perf_counter()
            m = {
                **rollout_metrics(host, stats["kl_coef"]),
                **stats,
                **side_metrics(rollout, monitor, reward),
                **sampling,
                "lr": float(schedule(it * updates_per_iter)),
                "perf/rollout_tokens_per_sec": clock["tokens"] / clock["generate_s"],
                "perf/episodes_per_sec": c.batch_size / (t3 - t0),
                "time/generate_s": clock["generate_s"],
                "time/score_s": t2 - t0 - clock["generate_s"],
                "time/update_s": t3 - t2,
                "time/generate_frac": clock["generate_s"] / (t3 - t0),
                "perf/compilations": perf.compilations(),  # so far: steady shapes stop adding to it
                "perf/prompt_width": rollout.prompt.shape[1],  # the shapes this iteration ran (rollout.length_bucket)
                "perf/response_width": rollout.response.shape[1],
            }
            done = it + 1
            if c.sample_every and (done % c.sample_every == 0 or done == c.num_steps):
                rollouts.write_samples(
                    os.path.join(run.workdir, "samples.jsonl"), tail.writer, done, tok, rollout, host["scores"], run
                )
            if tail.end_step(done, state, m):
                break
    return tail.close()


def draw_rollout(run: Run, steps: Steps, state, ref_params, reward, loader, group: int, clock, first: int, k: int):
    """Prompt batch first + k (each prompt `group` times in a row, padded to the bucket of the longest) and its
    sample keys, generated and scored; adds its generation time and tokens to clock."""
    c = run.config
    t = time.perf_counter()
    batch = rollouts.prompt_batch(loader, first + k, group, run, c.rollout.length_bucket)
    keys = rollouts.sample_keys(c.seed, first + k, c.batch_size, run)
    rollout = steps.generate(state.params["policy"], batch["prompt"], batch["prompt_mask"], keys)
    rollout = rollout.replace(prompt_index=batch["prompt_index"])
    rollout = jax.block_until_ready(rollouts.trim_responses(rollout, c.rollout.length_bucket))
    clock["generate_s"] += time.perf_counter() - t
    clock["tokens"] += int(parallel.to_host(rollout.response_mask).sum())
    return steps.score(state.params, ref_params, reward.params, rollout, reward.on_host(rollout))


def side_metrics(rollout: Rollout, monitor, reward=None) -> dict[str, float]:
    """What the iteration logs but never trains on: the RM's members' mean and spread (an ensemble's: what
    lcb / min trade off; one RM's: its score, 0), each reward function's mean (reward/<fn>, before its weight),
    and the monitor's score (e.g. the gold judge, to watch RM over-optimisation: Gao et al. 2022)."""
    out = {
        f"objective/rm_{k}": float(np.mean(parallel.to_host(v)))
        for k, v in (("mean", rollout.reward.member_mean), ("std", rollout.reward.member_std))
        if v is not None
    }
    out.update(rewards.part_means(reward, rollout.reward))
    if monitor is not None:
        out["objective/monitor_score"] = float(np.mean(parallel.to_host(monitor(rollout).score)))
    return out
