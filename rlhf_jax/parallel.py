"""Meshes, logical-axis rules, sharded initialisation and global batches.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`,
`kv`, `vocab`, `batch`, `length`); `config.mesh.rules` maps them onto the mesh
axes ("data", "fsdp", "tensor"). Changing a strategy (DP, FSDP, TP) is a
change of mesh shape and rules, never of model code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Rules are tried in order; a mesh axis already used by an earlier dimension of
# the same array is skipped, so activations [batch, length, embed] put batch on
# (data, fsdp) while params [vocab, embed] put embed on fsdp (FSDP / ZeRO-3).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
)
# A name no rule lists is unsharded: e.g. "ensemble", the member axis of an RM ensemble, so that each
# member shards like one model.


def mesh_shape(requested: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry so that data * fsdp * tensor == num_devices."""
    sizes = [int(requested[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1 (fill), got {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, which does not "
                f"divide the {num_devices} available devices. Choose sizes whose product divides {num_devices}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are "
            f"available. Set one axis to -1 to fill, e.g. --config.mesh.data=-1."
        )
    return tuple(sizes)


def make_mesh(requested: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(requested, len(devices))
    # Auto axes: Linen's logical constraints rely on compiler-propagated sharding.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Context in which jitted model code is traced: the mesh and the logical rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of (possibly) `nn.Partitioned` leaves; plain leaves are replicated."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args):
    """Runs `init_fn(*args)` (returning a boxed pytree) so each device only ever holds its shard.

    eval_shape → partition specs → jit(out_shardings): no full copy on one device. `args` (arrays) are the jitted
    function's arguments, never constants folded into the program.
    Returns (unboxed tree, its shardings).
    """
    with activate(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = logical_shardings(abstract, mesh, rules)
        tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def abstract_params(init_fn: Callable[[], Any], mesh: Mesh, rules):
    """ShapeDtypeStructs, carrying their shardings, of the unboxed tree `init_fn` would build: a target to
    restore a checkpoint into, with nothing allocated."""
    with activate(mesh, rules):
        abstract = jax.eval_shape(init_fn)
        shardings = logical_shardings(abstract, mesh, rules)
        # Unboxed under tracing: unboxing abstract leaves eagerly fails when a mesh is already active.
        unboxed = jax.eval_shape(nn.unbox, abstract)
    # `shardings` is a prefix of `unboxed`: an empty subtree there (optax's MaskedNode, the state a masked
    # optimizer keeps for a frozen leaf under LoRA) has one sharding here, and stays as it is.
    return jax.tree.map(
        lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, "shape") else x,
        shardings,
        unboxed,
    )


def batch_sharding(mesh: Mesh, rules, ndim: int = 2, lead: int = 0) -> NamedSharding:
    """Sharding of a batch-major array: axis `lead` (after `lead` unsharded leading axes, e.g. an
    ensemble's members) over the mesh axes `batch` maps to."""
    axes = nn.logical_to_mesh_axes((None,) * lead + ("batch",) + (None,) * (ndim - 1 - lead), rules)
    return NamedSharding(mesh, axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch axis is split (e.g. data * fsdp)."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules, lead: int = 0) -> dict[str, jax.Array]:
    """Builds global arrays from this process's rows (multi-host safe); the rows are axis `lead`."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim, lead), v)
        for k, v in local.items()
    }


def to_host(x) -> np.ndarray:
    """The whole global array as numpy on every process (an all-gather across hosts; device_get on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def check_batch(global_batch_size: int, mesh: Mesh, rules, name: str = "config.batch_size") -> None:
    n = data_parallel_size(mesh, rules)
    if global_batch_size % n:
        raise ConfigError(
            f"{name}={global_batch_size} is not divisible by the {n} data-parallel shards "
            f"(mesh {dict(mesh.shape)}). Use a multiple of {n}, or change config.mesh."
        )
    if global_batch_size % jax.process_count():
        raise ConfigError(f"{name}={global_batch_size} is not divisible by the {jax.process_count()} processes.")


def per_device_bytes(tree) -> int:
    """Bytes of `tree` held by the first local device (to check FSDP actually shards). Abstract leaves
    (ShapeDtypeStructs with a sharding, e.g. from `abstract_params`) count the shard they would have."""
    dev = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
            total += math.prod(shape) * leaf.dtype.itemsize
        for shard in getattr(leaf, "addressable_shards", []):
            if shard.device == dev:
                total += shard.data.nbytes
    return total
