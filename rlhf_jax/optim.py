"""The optimiser every stage uses: Adam(W) or TF-style Adam, a learning-rate schedule, clipping.

    update = -lr(step) · (adam_direction(g) + weight_decay · p)      (decoupled, AdamW)

applied after clipping g to `grad_clip_norm` (global L2 norm). Everything is
pure optax, so it runs inside `jax.jit` on sharded params and its state is a
pytree that shards like the params it mirrors.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax.errors import ConfigError

Schedule = Callable[[jax.Array | int], jax.Array]


def make_schedule(lr: float, schedule: str, warmup_steps: int, total_steps: int, final_lr_fraction: float) -> Schedule:
    """Learning rate (f32[]) at optimiser step `step` (0 for the first update).

    Linear warmup 0 → `lr` over `warmup_steps`, then `schedule` from `lr` at
    `warmup_steps` to `final_lr_fraction · lr` at `total_steps`, held after.
    PPO's anneal (lm-human-preferences: lr · (1 − step / n_updates)) is
    schedule="linear", warmup_steps=0, final_lr_fraction=0.
    """
    if schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"config.optim.schedule: {schedule!r} is unknown. Use constant, cosine or linear.")
    if schedule != "constant" and total_steps <= 0:
        raise ConfigError(
            f"config.optim.total_steps={total_steps}: a {schedule} schedule needs a positive "
            "decay horizon. Set optim.total_steps (or num_steps) to a positive number of updates."
        )
    final = lr * final_lr_fraction
    # A horizon shorter than the warmup still gives a well-defined (immediate) decay.
    decay_steps = max(total_steps - warmup_steps, 1)

    def lr_at(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup_steps, 1)
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if schedule == "constant":
            after = jnp.full_like(frac, lr)
        elif schedule == "linear":
            after = lr + (final - lr) * frac
        else:
            after = final + (lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(step < warmup_steps, warm, after)

    return lr_at


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam as TF1's `tf.train.AdamOptimizer` computes it (lm-human-preferences' optimiser).

        m_t = b1·m + (1−b1)·g        v_t = b2·v + (1−b2)·g²
        direction = sqrt(1−b2^t) / (1−b1^t) · m_t / (sqrt(v_t) + eps)

    eps sits outside the bias correction ("epsilon hat" in Kingma & Ba §2), so
    it is effectively eps / sqrt(1−b2^t) in optax.adam's terms: early steps are
    damped more. Multiply by −lr (e.g. `optax.scale_by_learning_rate`).
    """

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        step_scale = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: (step_scale * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def decay_mask(params):
    """True where weight decay applies.

    Rule: decay every parameter with ndim >= 2 (matmul kernels and embedding
    tables, as GPT-2 / nanoGPT); never 1-D ones (biases, norm scales), whose
    shrinkage only hurts. Works on boxed (nn.Partitioned) trees too.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, Schedule]:
    """(optimiser, schedule) from `config.optim`; `total_steps` (optimizer updates) overrides cfg.total_steps.

    name: "adamw" (optax Adam + decoupled decay), "adam" (optax Adam, no decay),
    "tf_adam" (`scale_by_tf_adam`, decoupled decay if weight_decay > 0).
    """
    total = cfg.total_steps if total_steps is None else total_steps
    schedule = make_schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, total, cfg.final_lr_fraction)
    if cfg.name in ("adamw", "adam"):
        direction = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif cfg.name == "tf_adam":
        direction = scale_by_tf_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        raise ConfigError(f"config.optim.name: {cfg.name!r} is unknown. Use adamw, adam or tf_adam.")
    if cfg.name == "adam" and cfg.weight_decay:
        raise ConfigError(
            f"config.optim.weight_decay={cfg.weight_decay} with name='adam': plain Adam has no "
            "weight decay. Use --config.optim.name=adamw, or set --config.optim.weight_decay=0."
        )
    if cfg.weight_decay < 0 or cfg.grad_clip_norm < 0:
        raise ConfigError(
            f"config.optim: weight_decay={cfg.weight_decay} and grad_clip_norm={cfg.grad_clip_norm} "
            "must be >= 0 (0 disables them)."
        )

    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(direction)
    if cfg.weight_decay > 0:
        # Added after the Adam direction, so decay is not rescaled by 1/sqrt(v) (Loshchilov & Hutter 2019).
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
