"""LoRA (Hu et al. 2021) on the params tree: which leaves train, the frozen reference, merging for export.

The adapters live in the same tree as the weights they adapt (rlhf_jax/models/layers.py:lora_delta):

    .../query/{kernel, bias, lora_a [D, r], lora_b [r, H, K]}      a Dense's kernel
    .../attn/{out, out_bias, out_lora_a [H, K, r], out_lora_b [r, D]}   attention's out projection

With config.model.lora.rank > 0 a stage trains only the adapters (and the scalar value / reward heads, which
start fresh and are tiny); every other leaf is frozen: `forward.apply` stops its gradient, and
`optimizer` gives it no update and no optimizer state. The base weights thus stay the initial policy, so the
reference policy of PPO's KL and DPO's ratio is the policy itself with its adapters off (`adapters_off`): no
second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models.layers import LoraConfig, ModelConfig

TRAINED_HEADS = ("value_head", "reward_head")  # new at their stage, so they train under LoRA too


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_adapter(name: str) -> bool:
    return name.endswith(("lora_a", "lora_b"))


def is_trainable(path) -> bool:
    """Under LoRA: an adapter leaf, or a leaf of a scalar head. `path` is a jax tree path (boxed or not)."""
    keys = _keys(path)
    return any(is_adapter(k) for k in keys) or any(k in TRAINED_HEADS for k in keys)


def trainable_labels(params):
    """ "train" | "frozen" for every leaf of `params` (boxed nn.Partitioned trees too)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "train" if is_trainable(p) else "frozen", params)


def optimizer(tx: optax.GradientTransformation, cfg: ModelConfig) -> optax.GradientTransformation:
    """`tx` on the trainable leaves only, when LoRA is on: frozen leaves get a zero update and no state
    (optax.set_to_zero keeps none, and `tx`'s moments exist for the trainable leaves alone)."""
    if cfg.lora.rank == 0:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, trainable_labels)


def stop_frozen_gradients(params, cfg: ModelConfig):
    """`params` with the gradient of every frozen leaf stopped (LoRA on), so backprop never computes it."""
    if cfg.lora.rank == 0:
        return params
    return jax.tree_util.tree_map_with_path(lambda p, x: x if is_trainable(p) else jax.lax.stop_gradient(x), params)


def adapters_off(params):
    """The same tree with every `lora_b` zeroed: x @ W + s · (x @ A) @ 0 = x @ W exactly, the base model."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _keys(p)[-1].endswith("lora_b") else x, params
    )


def reference(policy_params, ref_params):
    """The frozen reference policy: `ref_params` (a copy of the initial policy), or with LoRA, where stages pass
    None, the policy's own params with its adapters off."""
    return adapters_off(policy_params) if ref_params is None else ref_params


def merged(params, cfg: ModelConfig):
    """The tree without adapters, each adapted weight replaced by W + (alpha / r) · A @ B (numpy-free, jittable)."""
    if not isinstance(params, Mapping):
        return params
    out = {k: merged(v, cfg) for k, v in params.items() if not is_adapter(k)}
    for k, a in params.items():
        if k.endswith("lora_a"):
            weight = "kernel" if k == "lora_a" else k[: -len("_lora_a")]
            b = params[k[:-1] + "b"]
            delta = jnp.tensordot(a, b, axes=1)  # [*in, r] · [r, *out] → [*in, *out]
            out[weight] = params[weight] + cfg.lora.scale * delta
    return out


def without_adapters(params):
    """The tree minus its adapter leaves (what an earlier stage without LoRA saved)."""
    if not isinstance(params, Mapping):
        return params
    return {k: without_adapters(v) for k, v in params.items() if not is_adapter(k)}


def with_adapters_of(base, params):
    """`base` (a tree without adapters) with the adapter leaves of `params` (same tree, with them) put back."""
    if not isinstance(params, Mapping):
        return base
    return {k: (v if is_adapter(k) else with_adapters_of(base[k], v)) for k, v in params.items()}


def with_saved_adapters(base, saved: LoraConfig):
    """`base` (ShapeDtypeStructs or arrays, no adapters) plus abstract adapter leaves of rank `saved.rank` on the
    `saved.targets` weights: the shape of a checkpoint a LoRA run saved, to restore it into (adapters
    replicated: they are small)."""
    if not isinstance(base, Mapping):
        return base
    out = {k: with_saved_adapters(v, saved) for k, v in base.items()}
    adapted = [(name, "kernel", "lora", 1) for name in saved.targets if isinstance(base.get(name), Mapping)]
    if "out" in saved.targets and "out" in base and not isinstance(base["out"], Mapping):
        adapted.append((None, "out", "out_lora", 2))  # attention's out projection, [H, K, D]
    for module, weight, prefix, n_in in adapted:
        holder = out[module] if module else out
        w = holder[weight]
        rep = jax.sharding.NamedSharding(w.sharding.mesh, jax.sharding.PartitionSpec())
        holder[f"{prefix}_a"] = jax.ShapeDtypeStruct((*w.shape[:n_in], saved.rank), w.dtype, sharding=rep)
        holder[f"{prefix}_b"] = jax.ShapeDtypeStruct((saved.rank, *w.shape[n_in:]), w.dtype, sharding=rep)
    return out
