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

    def rest(self) -> dict:
        """Everything but params (checkpointed as a separate item)."""
        return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng, "extras": self.extras}

    def with_rest(self, rest: dict) -> "TrainState":
        return self.replace(step=rest["step"], opt_state=rest["opt_state"], rng=rest["rng"], extras=rest["extras"])


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
                          extras={k: jnp.asarray(v) for k, v in extras.items()})

    return parallel.sharded_init(init, mesh, rules)


def model_init_fn(model: nn.Module, seq_len: int, seed: int, heads=("lm", "value", "reward")):
    """A closure creating the boxed params of every head (so later stages find them)."""
    from rlhf_jax.models.gpt import positions_from_mask

    def init():
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        mask = jnp.ones((1, seq_len), jnp.int32)
        return model.init(jax.random.PRNGKey(seed), tokens, positions_from_mask(mask), mask, heads=heads)["params"]

    return init
