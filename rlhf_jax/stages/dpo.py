"""Stage 5: direct preference optimisation — the policy trained on ranked comparisons themselves, against
the frozen SFT policy (Rafailov et al. 2023): DPO, IPO, SimPO and the K-way Plackett-Luce form
(config.dpo.loss; the formulas, each beside its citation, are in rlhf_jax/preference.py).

Offline (default): the comparisons the RM reads, in any of its formats (ranked K-way, pairwise, hh_rlhf,
tldr), as [B, K, L] records best first. Online (config.dpo.online=True; Guo et al. 2024, "Direct Language
Model Alignment from Online AI Feedback"): each iteration samples online.samples_per_prompt responses for
each of batch_size prompts from the current policy, ranks them by config.reward (a trained RM, or a Python score
such as the built-in simulated labelers or the gold judge), and takes online.updates_per_iteration DPO steps on them.
Either way one jitted step computes the policy's and the reference's log-probs of every response
(the reference once per batch, never trained) and the loss:

    ρ_k = log π(y_k|x) − log π_ref(y_k|x)   (SimPO: log π(y_k|x) / |y_k|, no reference)
    loss = dpo_family_loss(ρ, ...)          rewards/* metrics are β·ρ, TRL's names

Metrics: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (over every compared pair),
logps/chosen, logps/rejected (chosen: the best response; rejected: the mean of the others), and on held-out
comparisons the same with eval/ (rewards/accuracies there is the implicit reward model's accuracy).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax import comparison_data, forward, lora, parallel, preference, rewards, rollout as rollouts, train_state
from rlhf_jax.errors import ConfigError
from rlhf_jax.loop import LoopTail
from rlhf_jax.run import Run


def check_config(c: ml_collections.ConfigDict) -> None:
    d = c.dpo
    if d.loss not in preference.DPO_LOSSES:
        raise ConfigError(f"config.dpo.loss={d.loss!r} is unknown; use one of {preference.DPO_LOSSES}.")
    if d.pairs not in preference.DPO_PAIRS:
        raise ConfigError(f"config.dpo.pairs={d.pairs!r} is unknown; use one of {preference.DPO_PAIRS}.")
    if d.beta <= 0:
        raise ConfigError(f"config.dpo.beta={d.beta} must be > 0 (DPO: 0.1; SimPO: about 2).")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(
            f"config.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5) (the share of "
            f"labels taken as flipped)."
        )
    if d.online:
        if c.online.samples_per_prompt < 2:
            raise ConfigError(
                f"config.online.samples_per_prompt={c.online.samples_per_prompt} must be >= 2: a "
                f"prompt's samples are ranked against each other."
            )
        if c.grad_accum != 1:
            raise ConfigError(
                "config.grad_accum must be 1 with config.dpo.online=True: each iteration's batch is its own samples."
            )
        if c.online.updates_per_iteration < 1:
            raise ConfigError(f"config.online.updates_per_iteration={c.online.updates_per_iteration} must be >= 1.")
        if c.rollout.temperature <= 0:
            raise ConfigError(
                f"config.rollout.temperature={c.rollout.temperature}: online DPO samples its pairs; "
                f"greedy decoding would give K equal responses. Use e.g. 0.7."
            )


# --- log-probs of the K responses of each prompt, in the two layouts -------------------------------------------------


def offline_logps(params, model, batch, rng=None):
    """Comparison records {tokens, input_mask [B, K, L], prompt_len [B]} → (Σ log π [B, K], lengths [B, K])."""
    return forward.comparison_logprobs(params, model, batch, rng)


def online_logps(params, model, batch, rng=None):
    """Samples {prompt [B, K, P] left-padded, response [B, K, N]} → (Σ log π [B, K], lengths [B, K]), of the
    untempered policy (the object DPO trains), whatever temperature drew them; with `rng`, under model.dropout
    as offline_logps (the reference's are computed without it)."""
    B, K = batch["response"].shape[:2]
    flat = {k: batch[k].reshape(B * K, -1) for k in ("prompt", "prompt_mask", "response", "response_mask")}
    lp = forward.response_logprob_sums(
        params, model, flat["prompt"], flat["prompt_mask"], flat["response"], flat["response_mask"], 1.0, rng
    )
    return lp.reshape(B, K), jnp.sum(batch["response_mask"], axis=-1).astype(jnp.float32)


def implicit(params, ref_params, model, batch, d, logps_fn, rng=None):
    """(ρ [B, K], the policy's log-prob sums [B, K]) of a batch (preference.implicit_rewards); ref_params None:
    the policy with its LoRA adapters off."""
    logps, lengths = logps_fn(params, model, batch, rng)
    ref = (
        None
        if d.loss == "simpo"
        else jax.lax.stop_gradient(logps_fn(lora.reference(params, ref_params), model, batch)[0])
    )
    return preference.implicit_rewards(d.loss, logps, ref, lengths), logps


def batch_metrics(rho, logps, valid, loss, beta, prefix=""):
    """TRL's names: rewards/{chosen, rejected, margins, accuracies} of β·ρ, logps/{chosen, rejected}."""
    r = preference.comparison_metrics(beta * rho, valid)
    lp = preference.comparison_metrics(logps, valid)
    return {
        f"{prefix}loss": loss,
        f"{prefix}rewards/chosen": r["chosen_reward"],
        f"{prefix}rewards/rejected": r["rejected_reward"],
        f"{prefix}rewards/margins": r["margin"],
        f"{prefix}rewards/accuracies": r["accuracy"],
        f"{prefix}logps/chosen": lp["chosen_reward"],
        f"{prefix}logps/rejected": lp["rejected_reward"],
    }


def family_loss(rho, valid, d):
    """config.dpo's loss of implicit rewards ρ [B, K] (best first): (mean f32 [], stats)."""
    return preference.dpo_family_loss(rho, valid, d.loss, d.beta, d.label_smoothing, d.gamma, d.pairs)


def make_train_step(model, tx, schedule, c, logps_fn, grad_accum: int = 1, inject_nonfinite: tuple[int, ...] = ()):
    """step(state, ref_params, batch) -> (state, metrics). Like the RM's step, the batch is cut into
    `grad_accum` microbatches whose losses are weighted by the whole batch's prompt count."""
    d = c.dpo

    def step(state: train_state.TrainState, ref_params, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        n_examples = preference.num_compared(lambda r, v: family_loss(r, v, d), batch["valid"])

        def share(p, mb, rng):
            rho, logps = implicit(p, ref_params, model, mb, d, logps_fn, rng)
            mean, stats = family_loss(rho, mb["valid"], d)
            return mean * stats["num_examples"] / n_examples, (rho, logps)

        loss, grads, (rho, logps) = train_state.accumulate_grads(share, state.params, batch, rng, grad_accum)
        rho, logps = rho.reshape(batch["valid"].shape), logps.reshape(batch["valid"].shape)
        params, opt_state, nonfinite = train_state.apply_if_finite(
            tx, grads, loss, state.params, state.opt_state, state.nonfinite, state.step, inject_nonfinite
        )
        metrics = batch_metrics(rho, logps, batch["valid"], loss, d.beta)
        metrics.update({"grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, nonfinite=nonfinite), metrics

    return step


def evaluate(implicit_fn, params, ref_params, source, run: Run) -> dict[str, float]:
    """Held-out loss and implicit-reward metrics over every comparison of `source` (gathered, then reduced)."""
    from rlhf_jax.data.loader import eval_batches

    c, rho, logps, valid = run.config, [], [], []
    with parallel.activate(run.mesh, run.rules):
        for local in eval_batches(source, c.batch_size, c.eval_batches or None):
            batch = parallel.global_batch(comparison_data.trimmed(local, c.data.length_bucket), run.mesh, run.rules)
            r, lp = implicit_fn(params, ref_params, batch)
            rho.append(parallel.to_host(r))
            logps.append(parallel.to_host(lp))
            valid.append(parallel.to_host(batch["valid"]))
    r, lp, v = (np.concatenate(x) for x in (rho, logps, valid))
    keep = v.sum(1) >= 2  # the last batch's padding rows
    r, lp, v = jnp.asarray(r[keep]), jnp.asarray(lp[keep]), jnp.asarray(v[keep])
    loss, _ = family_loss(r, v, c.dpo)
    return {k: float(x) for k, x in batch_metrics(r, lp, v, loss, c.dpo.beta, "eval/").items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes) the DPO stage; returns the last logged metrics."""
    from rlhf_jax.data.loader import BatchLoader

    run = Run(config, workdir)
    c = run.config
    check_config(c)
    if c.dpo.online:
        tok, prompts, columns = rollouts.prompt_data(run)
        train_source = None
        # held-out comparisons (data.eval_path) to measure the implicit reward model on
        eval_source, _ = comparison_data.build(run, c.data.eval_path, c.data.eval_lines)
    else:
        tok, train_source, eval_source, train_stats, eval_stats = comparison_data.datasets(run)
        prompts = columns = None
        run.log(f"dpo data: train {train_stats}, eval {eval_stats}")
    updates = c.online.updates_per_iteration if c.dpo.online else 1
    model, tx, schedule, state, shardings = run.setup_state(
        updates_per_step=updates, start=run.init_heads(("trunk", "lm_head"))
    )
    # The initial params (before a resume), copied: None with SimPO (no reference) and with LoRA (the reference
    # is the policy, adapters off: lora.reference).
    ref_params = (
        None
        if c.dpo.loss == "simpo" or c.model.lora.rank
        else run.frozen_init_params(state.params, heads=("trunk", "lm_head"))
    )
    state, _ = run.restore_or(state)
    start = int(jax.device_get(state.step)) // updates

    logps_fn = online_logps if c.dpo.online else offline_logps
    with parallel.activate(run.mesh, run.rules):
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, c, logps_fn, c.grad_accum, tuple(c.debug_nonfinite_steps)),
            out_shardings=(shardings, parallel.replicated(run.mesh)),
            donate_argnums=(0,),
        )
        implicit_fn = jax.jit(lambda p, r, b: implicit(p, r, model, b, c.dpo, offline_logps))
    evaluate_at = (
        None
        if eval_source is None
        else lambda params: lambda: evaluate(implicit_fn, params, ref_params, eval_source, run)
    )  # params → evaluate()
    tail = LoopTail(run, start, "dpo", postfix={"loss": "loss", "acc": "rewards/accuracies"})
    with parallel.activate(run.mesh, run.rules):
        if not c.dpo.online:
            loader = BatchLoader(train_source, c.batch_size, seed=c.seed)
            run.log(
                f"dpo ({c.dpo.loss}, β {c.dpo.beta}): {loader.num_examples} comparisons, steps {start}→{c.num_steps}"
            )
            for step, local in loader.iterate(start, c.num_steps - start):
                local = comparison_data.trimmed(local, c.data.length_bucket)
                batch = parallel.global_batch(local, run.mesh, run.rules)
                train = tail.compiled_for("dpo train step", step_fn, state, ref_params, batch)
                state, metrics = train(state, ref_params, batch)
                if tail.end_step(step + 1, state, metrics, evaluate=evaluate_at and evaluate_at(state.params)):
                    break
        else:
            online_loop(
                run, tail, state, ref_params, step_fn, model, tok, (prompts, columns), updates, start, evaluate_at
            )
    return tail.close()


def online_loop(
    run: Run, tail: LoopTail, state, ref_params, step_fn, model, tok, prompts, updates: int, start: int, evaluate_at
):
    """Online DPO's iterations: sample K per prompt → rank by config.reward → `updates` DPO steps.
    prompts: (source, columns) of rollouts.prompt_data."""
    from rlhf_jax.data.loader import BatchLoader

    c = run.config
    prompts, columns = prompts
    K = c.online.samples_per_prompt
    loader = BatchLoader(prompts, c.batch_size, seed=c.seed)  # batch_size comparisons per step, as offline
    rollout_fn = jax.jit(rollouts.make_rollout_fn(model, c, tok))
    reward, monitor = rewards.source(run, c, tok, columns), rewards.monitor(run, c, tok, columns)
    rank_fn = jax.jit(lambda rollout, scores: best_first(rollout, scores, K))
    run.log(
        f"online dpo ({c.dpo.loss}, β {c.dpo.beta}): {loader.num_examples} prompts, {c.batch_size} "
        f"prompts x {K} samples per iteration, {updates} updates each, iterations {start}→{c.num_steps}"
    )
    for it in range(start, c.num_steps):
        t0 = time.perf_counter()
        batch = rollouts.prompt_batch(loader, it, K, run)
        rollout = rollout_fn(
            state.params, batch["prompt"], batch["prompt_mask"], rollouts.sample_keys(c.seed, it, c.batch_size * K, run)
        ).replace(prompt_index=batch["prompt_index"])
        scored = reward(rollout)
        scores = scored.score
        ranked = rank_fn(rollout, scores)
        t1 = time.perf_counter()
        for u in range(updates):
            if it == start and u == 0:
                step_fn = tail.compile_once("online dpo train step", step_fn, state, ref_params, ranked)
            state, metrics = step_fn(state, ref_params, ranked)
        metrics = {
            **jax.device_get(metrics),
            "objective/scores": float(np.mean(parallel.to_host(scores))),
            "objective/response_length": float(np.mean(parallel.to_host(rollout.response_mask).sum(1))),
            "time/generate_s": t1 - t0,
            "time/update_s": time.perf_counter() - t1,
            **rewards.part_means(reward, scored),
        }
        if monitor is not None:
            metrics["objective/monitor_score"] = float(np.mean(parallel.to_host(monitor(rollout).score)))
        if tail.end_step(it + 1, state, metrics, evaluate=evaluate_at and evaluate_at(state.params)):
            break


def best_first(rollout: rollouts.Rollout, scores, K: int):
    """[B·K] samples (K consecutive per prompt) and their scores → the [B, K, ...] records of the loss, each
    prompt's samples sorted best first (ties keep sampling order), all valid."""
    BK = scores.shape[0]
    order = jnp.argsort(-scores.reshape(BK // K, K), axis=1, stable=True)
    pick = lambda x: jnp.take_along_axis(
        x.reshape(BK // K, K, *x.shape[1:]), order.reshape(*order.shape, *([1] * (x.ndim - 1))), axis=1
    )
    out = {k: pick(getattr(rollout, k)) for k in ("prompt", "prompt_mask", "response", "response_mask")}
    out["valid"] = jnp.ones((BK // K, K), jnp.int32)
    return out
