"""The train state: one pytree, sharded on the mesh, checkpointed whole."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32[]: optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: folded with `step` each step, so a resumed run draws the same numbers
    extras: dict  # stage extras, e.g. {"kl_coef": f32[]}; 0-d arrays only (orbax wants arrays)
    # Updates skipped because the loss or the gradient was not finite: int32 [count, step of the first (-1: none)].
    nonfinite: jax.Array

    def rest(self) -> dict:
        """Everything but params (checkpointed as a separate item)."""
        return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng, "extras": self.extras,
                "nonfinite": self.nonfinite}

    def with_rest(self, rest: dict) -> "TrainState":
        return self.replace(step=rest["step"], opt_state=rest["opt_state"], rng=rest["rng"], extras=rest["extras"],
                            nonfinite=rest["nonfinite"])


def create(init_params: Callable[[], Any], tx: optax.GradientTransformation, mesh, rules, seed: int,
           extras: dict | None = None) -> tuple[TrainState, TrainState]:
    """Sharded train state and its shardings; `init_params()` returns boxed (logically annotated) params.

    The optimizer state is built from the boxed params, so its moments inherit the
    params' logical axes and shard exactly like them (FSDP shards them too).
    """
    extras = extras or {}

    def init():
        params = init_params()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.PRNGKey(seed)),
                          extras={k: jnp.asarray(v) for k, v in extras.items()},
                          nonfinite=jnp.array([0, -1], jnp.int32))

    return parallel.sharded_init(init, mesh, rules)


def apply_if_finite(tx: optax.GradientTransformation, grads, loss, params, opt_state, nonfinite, step,
                    inject_steps: tuple[int, ...] = ()):
    """One optimizer update, applied only if `loss` and every gradient are finite.

    Returns (params, opt_state, nonfinite). A non-finite update leaves params and
    optimizer state exactly as they were and is counted in `nonfinite` = [count, first
    step]; the host reads that counter where it already syncs (logging) and before
    every checkpoint, and stops or warns (config.nonfinite). The check costs no host
    sync: it is a select inside the jitted step.

    `inject_steps` (config.debug_nonfinite_steps) poisons the loss and gradients at
    those steps, to exercise this path end to end.
    """
    if inject_steps:
        poison = jnp.where(jnp.isin(step, jnp.asarray(inject_steps)), jnp.nan, 1.0)
        loss, grads = loss * poison, jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    count, first = nonfinite[0], nonfinite[1]
    nonfinite = jnp.stack([count + (~ok).astype(jnp.int32),
                           jnp.where((first < 0) & ~ok, jnp.asarray(step, jnp.int32), first)])
    return keep(new_params, params), keep(new_opt_state, opt_state), nonfinite


def model_init_fn(model: nn.Module, seq_len: int, seed: int, heads=("lm", "value", "reward")):
    """A closure creating the boxed params of every head (so later stages find them)."""
    from rlhf_jax.models.gpt import positions_from_mask

    def init():
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        mask = jnp.ones((1, seq_len), jnp.int32)
        return model.init(jax.random.PRNGKey(seed), tokens, positions_from_mask(mask), mask, heads=heads)["params"]

    return init
