"""Import a local Hugging Face checkpoint straight into the sharded params layout.

Each leaf is built with `jax.make_array_from_callback` on the sharding the model's logical axes
give it; the callback reads only that device's block from the safetensors file (`get_slice`), so
no device and no host buffer ever holds a whole sharded weight. One exception, by layout:
GPT-NeoX's fused query_key_value interleaves q, k and v per head, so a device whose shard covers
heads [a, b) reads the rows of those heads for all three (3x its share of that tensor) and keeps
its own. GPT-2's fused c_attn stores [q | k | v] as three contiguous blocks and is read exactly.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from rlhf_jax.hf import layout
from rlhf_jax.models.layers import ModelConfig


class TensorReader:
    """Named tensors of model.safetensors, or of the shards listed in model.safetensors.index.json. Each read
    maps the file and unmaps it after: a file held open for the whole load keeps every page it has read
    resident beside the arrays made from them (SmolLM2's 513 MiB of f32 weights loaded at a peak of 1,338 MiB)."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        else:
            single = os.path.join(hf_dir, "model.safetensors")
            if not os.path.isfile(single):
                raise FileNotFoundError(
                    f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json "
                    f"exists (PyTorch .bin checkpoints are not read; re-save with "
                    f"save_pretrained(..., safe_serialization=True))."
                )
            with safe_open(single, framework="numpy") as f:
                files = {k: "model.safetensors" for k in f.keys()}
        self.hf_dir = hf_dir
        self._files = files

    def _opened(self, name: str):
        return safe_open(os.path.join(self.hf_dir, self._files[name]), framework="numpy")

    def names(self) -> set[str]:
        return set(self._files)

    def resolve(self, name: str) -> str:
        """`name`, or the same name without the base-model prefix (a checkpoint saved from the bare
        GPT2Model / GPTNeoXModel / LlamaModel has no "transformer." / "gpt_neox." / "model.")."""
        if name in self._files:
            return name
        bare = name.split(".", 1)[1]
        if bare in self._files:
            return bare
        raise KeyError(
            f"{self.hf_dir}: tensor {name!r} is missing from the checkpoint; the config.json and "
            f"the weights disagree, or this is not the architecture config.json names."
        )

    def shape(self, name: str) -> tuple[int, ...]:
        with self._opened(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Tensor `name`'s block `index`, copied out of the file (once: no second copy of what the slice read)."""
        with self._opened(name) as f:
            return np.asarray(f.get_slice(name)[index])


def _hf_shape(src: layout.Source, shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> tuple[int, int]:
    """(in, out) sizes of the HF tensor as our leaf sees it; an error naming both shapes on mismatch."""
    n_in = math.prod(shape[: src.n_in])
    n_out = math.prod(shape[src.n_in :])
    if src.n_in == 0:
        got_in, got_out = 1, hf_shape[0] if len(hf_shape) == 1 else -1
    else:
        got_out, got_in = hf_shape if src.out_first else hf_shape[::-1]
    need_out = n_out if src.out_index is None else int(src.out_index.max()) + 1
    if got_in != n_in or (got_out != need_out if src.out_index is None else got_out < need_out):
        raise ValueError(
            f"HF tensor {src.name} has shape {hf_shape}, which does not fit our leaf of shape "
            f"{shape}; the model config does not match the checkpoint's config.json."
        )
    return got_in, got_out


def read_block(
    reader: TensorReader, src: layout.Source, shape: tuple[int, ...], index: tuple[slice, ...]
) -> np.ndarray:
    """Our leaf's block `index` (one slice per axis) read from HF tensor `src.name`, as float32.

    Reads the bounding box of the needed HF rows and columns, then picks them out (exact for
    everything but NeoX's fused qkv; see the module docstring)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    in_shape, out_shape = shape[: src.n_in], shape[src.n_in :]
    rows = np.arange(math.prod(in_shape)).reshape(in_shape)[index[: src.n_in]].ravel()
    cols = np.arange(math.prod(out_shape)).reshape(out_shape)[index[src.n_in :]].ravel()
    if src.out_index is not None:
        cols = src.out_index[cols]
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    if src.n_in == 0:
        block = reader.read(src.name, (slice(c0, c1),))[None, :]
    elif src.out_first:
        block = reader.read(src.name, (slice(c0, c1), slice(r0, r1))).T
    else:
        block = reader.read(src.name, (slice(r0, r1), slice(c0, c1)))
    if not (_is_range(rows, r0, r1) and _is_range(cols, c0, c1)):  # contiguous (the usual case): no copy
        block = block[np.ix_(rows - r0, cols - c0)]
    sub_shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
    return block.astype(np.float32, copy=False).reshape(sub_shape)


def _is_range(idx: np.ndarray, start: int, stop: int) -> bool:
    return len(idx) == stop - start and bool((idx == np.arange(start, stop)).all())


def model_config(hf_dir: str, **runtime: Any) -> ModelConfig:
    """Our ModelConfig for the HF model in `hf_dir`; `runtime` sets dtype, dropout, remat."""
    return ModelConfig(
        **layout.model_fields(layout.read_config(hf_dir), os.path.join(hf_dir, "config.json")), **runtime
    )


def reward_offset(hf_dir: str) -> float:
    """The constant our exported reward head adds to HF's bias-free score (0 for other checkpoints)."""
    return float(layout.read_config(hf_dir).get(layout.REWARD_OFFSET_KEY, 0.0))


def load_params(hf_dir: str, params_like):
    """`params_like` (our params tree of sharded arrays) with every leaf the HF checkpoint holds
    replaced by the checkpoint's values, in the same shardings; other leaves (e.g. the value head of a
    causal LM) are returned unchanged. A ...ForSequenceClassification checkpoint with one label also
    fills reward_head (kernel from score.weight; bias from config.json's rlhf_jax_reward_offset, else 0)."""
    hf = layout.read_config(hf_dir)
    where = os.path.join(hf_dir, "config.json")
    family = layout.family_of(hf, where)
    cfg = ModelConfig(**layout.model_fields(hf, where))
    reader = TensorReader(hf_dir)
    is_rm = layout.is_sequence_classifier(hf)
    n_labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 1)
    if is_rm and n_labels != 1:
        raise ValueError(
            f"{where}: a sequence classifier with {n_labels} labels; only num_labels=1 "
            f"(a scalar reward) maps onto reward_head."
        )
    table = layout.weight_table(cfg, family, lm_head=not is_rm, reward_head=is_rm)
    table = {k: _resolved(v, reader) for k, v in table.items()}

    def load(path, leaf):
        key = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
        if key == ("reward_head", "bias") and is_rm:
            bias = np.full(leaf.shape, reward_offset(hf_dir), np.float32)
            return jax.make_array_from_callback(bias.shape, leaf.sharding, lambda idx: bias[idx])
        if key not in table:
            return leaf
        src, shape = table.pop(key), tuple(leaf.shape)
        _hf_shape(src, shape, reader.shape(src.name))
        _check_divisible(key, shape, leaf.sharding)
        blocks = {}  # devices holding the same block (replicas along data, say) share one read

        def block(idx):
            k = tuple((sl.start, sl.stop, sl.step) for sl in idx)
            if k not in blocks:
                blocks[k] = read_block(reader, src, shape, idx)
            return blocks[k]

        return jax.make_array_from_callback(shape, leaf.sharding, block)

    out = jax.tree_util.tree_map_with_path(load, params_like)
    if table:
        raise ValueError(
            f"{hf_dir}: our params tree has no place for {sorted('/'.join(k) for k in table)[:5]}; "
            f"build the model from this checkpoint's config (rlhf_jax.hf.model_config)."
        )
    return out


def load_model(hf_dir: str, mesh, rules, **runtime: Any):
    """(TransformerLM, params) of the HF model in `hf_dir`, sharded on `mesh` by `rules`, with no random
    init: params hold only what the checkpoint has — trunk and lm_head (absent when tied), or trunk and
    reward_head for a sequence classifier. `runtime` sets dtype, dropout, remat."""
    import flax.linen as nn

    from rlhf_jax import parallel, train_state
    from rlhf_jax.models.gpt import TransformerLM

    model = TransformerLM(model_config(hf_dir, **runtime))
    with parallel.activate(mesh, rules):
        abstract = jax.eval_shape(train_state.model_init_fn(model, 8, 0))
        shardings = parallel.logical_shardings(abstract, mesh, rules)
    like = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), nn.unbox(abstract), shardings
    )
    is_rm = layout.is_sequence_classifier(layout.read_config(hf_dir))
    keep = ("trunk", "reward_head") if is_rm else ("trunk", "lm_head")
    return model, load_params(hf_dir, {k: v for k, v in like.items() if k in keep})


def _check_divisible(key: tuple[str, ...], shape: tuple[int, ...], sharding) -> None:
    try:
        sharding.shard_shape(shape)
    except ValueError as e:
        raise ValueError(
            f"{'/'.join(key)} of shape {shape} cannot be split as {sharding.spec} on mesh "
            f"{dict(sharding.mesh.shape)} "
            f"(e.g. GPT-2's vocabulary of 50257 over tensor=2). Use mesh axes that divide it, e.g. "
            f"--config.mesh.tensor=1 and shard with fsdp instead."
        ) from e


def _resolved(src: layout.Source, reader: TensorReader) -> layout.Source:
    return layout.Source(reader.resolve(src.name), src.n_in, src.out_first, src.out_index)
