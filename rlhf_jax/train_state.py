"""The train state: one pytree, sharded on the mesh, checkpointed whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import parallel
from rlhf_jax.errors import UserError


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
        return {
            "step": self.step,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "extras": self.extras,
            "nonfinite": self.nonfinite,
        }

    def with_rest(self, rest: dict) -> TrainState:
        return self.replace(
            step=rest["step"],
            opt_state=rest["opt_state"],
            rng=rest["rng"],
            extras=rest["extras"],
            nonfinite=rest["nonfinite"],
        )


def create(
    init_params: Callable[[], Any],
    tx: optax.GradientTransformation,
    mesh,
    rules,
    seed: int,
    extras: dict | None = None,
    members: int = 0,
    start: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, TrainState]:
    """Sharded train state and its shardings; `init_params()` returns boxed (logically annotated) params.

    The optimizer state is built from the boxed params, so its moments inherit the
    params' logical axes and shard exactly like them (FSDP shards them too).

    members > 0: an ensemble (`ensemble_init_fn` params, leading member axis): the optimizer state and the
    RNG get that axis too — member i's are those of a single model of seed + i — so a member's update,
    vmapped, is exactly that model's (gradient clipping, step counts and dropout per member).

    start: the params that begin from elsewhere (a checkpoint, an earlier stage), as a function of the params'
    abstract tree (ShapeDtypeStructs with their shardings) returning it with those leaves loaded as arrays and
    every other leaf left abstract. Loaded leaves replace init_params()'s before the optimizer state is built,
    inside the one jitted init, so their random init is never computed (XLA drops what nothing uses); the other
    leaves get exactly the values they would without `start`.
    """
    init_fn, given = _state_init_fn(init_params, tx, seed, extras, members), {}
    if start is not None:
        abstract = parallel.abstract_params(init_params, mesh, rules)
        loaded = jax.tree_util.tree_flatten_with_path(start(abstract))[0]
        given = {jax.tree_util.keystr(path): leaf for path, leaf in loaded if isinstance(leaf, jax.Array)}
    return parallel.sharded_init(init_fn, mesh, rules, given)


def init_params_given(init_params: Callable[[], Any], mesh, rules, given: dict, under: str | None = None):
    """init_params()'s params (their `under` entry, where given), sharded and unboxed, with the leaves `given`
    names (by key path from the root, as jax.tree_util.keystr writes it) taken as they are: the others get
    exactly the values `create` gives them, and nothing is computed for the given ones or outside `under`."""

    def init(g):
        params = _with_given(init_params(), g)
        return params[under] if under else params

    return parallel.sharded_init(init, mesh, rules, given)[0]


def abstract_state(
    init_params: Callable[[], Any],
    tx: optax.GradientTransformation,
    mesh,
    rules,
    seed: int,
    extras: dict | None = None,
    members: int = 0,
) -> tuple[TrainState, TrainState]:
    """What `create` would build, as ShapeDtypeStructs carrying their shardings, and those shardings: nothing
    is allocated (rlhf_jax/plan.py compiles a stage's step from these)."""
    abstract = parallel.abstract_params(_state_init_fn(init_params, tx, seed, extras, members), mesh, rules)
    return abstract, jax.tree.map(lambda x: x.sharding, abstract)


def _state_init_fn(init_params, tx, seed: int, extras: dict | None, members: int) -> Callable[[], TrainState]:
    extras = extras or {}

    def init(given: dict | None = None):
        params = _with_given(init_params(), given or {})
        if members:
            opt_state = jax.vmap(tx.init)(params)
            rng = jnp.stack([jax.random.key_data(jax.random.PRNGKey(seed + i)) for i in range(members)])
        else:
            opt_state, rng = tx.init(params), jax.random.key_data(jax.random.PRNGKey(seed))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            rng=rng,
            extras={k: jnp.asarray(v) for k, v in extras.items()},
            nonfinite=jnp.array([0, -1], jnp.int32),
        )

    return init


def _with_given(params, given: dict):
    """Boxed `params` with the leaves `given` names (by key path, as jax.tree_util.keystr writes it) replaced,
    keeping each leaf's logical axes."""

    def pick(path, x):
        key = jax.tree_util.keystr(path)
        if key not in given:
            return x
        return x.replace_boxed(given[key]) if isinstance(x, nn.meta.AxisMetadata) else given[key]

    return jax.tree_util.tree_map_with_path(pick, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def accumulate_grads(loss_fn: Callable, params, batch, rng: jax.Array, grad_accum: int):
    """loss_fn's value and gradient summed over `grad_accum` microbatches of `batch` (every leaf cut along its
    leading axis), one at a time in a scan: (loss f32 [], grads like params, aux stacked [grad_accum, ...]).

    loss_fn(params, micro, rng) -> (loss, aux), microbatch i drawing rng folded with i. For grad_accum to
    change memory and not the result, a microbatch's loss must be its share of the whole batch's: summed
    over its examples and divided by the whole batch's count (or divided by it afterwards).
    """
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        total_grads, total = carry
        return (jax.tree.map(jnp.add, total_grads, grads), total + loss), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), aux = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(grad_accum), micro))
    return loss, grads, aux


def apply_if_finite(
    tx: optax.GradientTransformation,
    grads,
    loss,
    params,
    opt_state,
    nonfinite,
    step,
    inject_steps: tuple[int, ...] = (),
):
    """One optimizer update, applied only if `loss` and every gradient are finite.

    Returns (params, opt_state, nonfinite). A non-finite update leaves params and
    optimizer state exactly as they were and is counted in `nonfinite` = [count, first
    step]; the host reads that counter where it already syncs (logging) and before
    every checkpoint, and stops or warns (config.nonfinite). The check costs no host
    sync: it is a select inside the jitted step.

    `inject_steps` (config.debug_nonfinite_steps) poisons the loss and gradients at
    those steps, to exercise this path end to end.

    The choice is a `lax.cond`, not a select between new and old state: with the state
    donated, a select needs the old Adam moments after the new ones overwrite them, so
    XLA copied every moment first (1 GB of temporaries at SmolLM2's f32 DPO step's peak).
    """
    if inject_steps:
        poison = jnp.where(jnp.isin(step, jnp.asarray(inject_steps)), jnp.nan, 1.0)
        loss, grads = loss * poison, jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))

    def update(params, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(ok, update, lambda p, s: (p, s), params, opt_state)
    count, first = nonfinite[0], nonfinite[1]
    nonfinite = jnp.stack(
        [count + (~ok).astype(jnp.int32), jnp.where((first < 0) & ~ok, jnp.asarray(step, jnp.int32), first)]
    )
    return params, opt_state, nonfinite


class NonFiniteError(UserError, RuntimeError):
    """A non-finite loss or gradient under config.nonfinite="stop"; the message names the step and checkpoint."""


class NonFiniteGuard:
    """The host side of `apply_if_finite`: acts on updates skipped since the last check (config.nonfinite).

    Checked where a loop already syncs with the device (logging) and before every save. "stop" raises
    NonFiniteError naming the first bad step and the last good checkpoint; "skip" warns and goes on.
    """

    def __init__(self, policy: str, log):
        self.policy, self.log = policy, log
        self.seen = 0  # skipped updates already reported (restored with a checkpoint: `resumed`)

    def resumed(self, state_rest: dict) -> None:
        self.seen = int(jax.device_get(state_rest["nonfinite"])[0])

    def check(self, state, last_good) -> None:
        """last_good: () -> description of the newest good checkpoint, called only before raising."""
        count, first = (int(v) for v in jax.device_get(state.nonfinite))
        if count <= self.seen:
            return
        new, self.seen = count - self.seen, count
        if self.policy == "skip":
            self.log(
                f"WARNING: {new} update(s) skipped for a non-finite loss or gradient ({count} in this run so "
                f"far, the first at step {first}); params and optimizer state were left unchanged "
                f"(config.nonfinite=skip)."
            )
            return
        raise NonFiniteError(
            f"Non-finite loss or gradient at step {first} ({count} update(s) skipped by step "
            f"{int(jax.device_get(state.step))}); stopped without saving. Last good checkpoint: {last_good()}. "
            f"Fix the cause (a lower --config.optim.lr, --config.optim.grad_clip_norm, bad data) and rerun the same "
            f"command to resume from that checkpoint, or set --config.nonfinite=skip to skip such updates."
        )


def model_init_fn(model: nn.Module, seq_len: int, seed: int, heads=("lm", "value", "reward")):
    """A closure creating the boxed params of every head (so later stages find them)."""
    from rlhf_jax.models.gpt import positions_from_mask

    def init():
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        mask = jnp.ones((1, seq_len), jnp.int32)
        return model.init(jax.random.PRNGKey(seed), tokens, positions_from_mask(mask), mask, heads=heads)["params"]

    return init


ENSEMBLE_AXIS = "ensemble"  # the logical name of an ensemble's member axis (no rule lists it: unsharded)


def ensemble_init_fn(model: nn.Module, seq_len: int, seed: int, members: int, heads=("lm", "value", "reward")):
    """Boxed params of `members` models stacked on a leading "ensemble" axis; member i is initialised exactly
    as `model_init_fn(..., seed + i)`. Every other axis keeps its logical name, so a member shards like one
    model."""
    inits = [model_init_fn(model, seq_len, seed + i, heads) for i in range(members)]

    def init():
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[f() for f in inits])
        return flax.core.meta.add_axis(stacked, 0, {nn.PARTITION_NAME: ENSEMBLE_AXIS})

    return init
