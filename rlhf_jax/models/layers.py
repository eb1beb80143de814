"""Building blocks of the decoder: dense, norms, rotary embeddings, attention, MLP.

Every parameter is created with logical axis names (see `rlhf_jax/parallel.py`)
and every matmul runs in the compute dtype with f32 accumulation
(`preferred_element_type=float32`), then casts back to the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
P = nn.with_logical_partitioning

# The projections LoRA can adapt: attention's query / key / value / out, the MLP's gate (SwiGLU) / up / down,
# and the untied output layer (lm_head), the one place an adapter shifts each token's logit directly.
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down", "lm_head")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) · B A x on the `targets` projections.

    rank 0 turns LoRA off (no adapter params). The paper adapts query and value; alpha = rank gives scale 1.
    """

    rank: int = 0
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))  # a list from JSON or the command line

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapts(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets


ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequencies stretched for contexts longer than pre-training's (transformers' rope_parameters).

    "default": none. "linear": every frequency divided by `factor` (positions interpolated). "llama3" (Llama
    3.1+): wavelengths over original_max_len / low_freq_factor stretch by `factor`, those under
    original_max_len / high_freq_factor stay, and the band between blends the two smoothly.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the decoder; covers the GPT-2, NeoX, LLaMA, Mistral and Qwen2 families."""

    vocab_size: int = 512
    # Ids the tokenizer can produce (0: all of vocab_size). A padded vocabulary (Pythia: 50,304 rows for
    # 50,277 tokens; ours: rounded up to a multiple of 128) gets the logits above it masked, so no stage
    # samples or scores an id the tokenizer cannot decode.
    token_vocab: int = 0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (multi-head); fewer gives grouped-query attention
    d_ff: int = 0  # 0 means 4 * d_model
    max_len: int = 256
    position: str = "learned"  # "learned" (GPT-2) | "rope" (NeoX, LLaMA)
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # fraction of each head's dims that rotate (Pythia / GPT-NeoX: 0.25)
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    # > 0: each query attends to the last `sliding_window` cache slots only, its own included (Mistral); the
    # KV cache still keeps every slot.
    sliding_window: int = 0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (tanh approximation, GPT-2) | "gelu_exact" (erf, GPT-NeoX) | "swiglu" (LLaMA)
    parallel_residual: bool = False  # GPT-NeoX: x + attn(norm_attn(x)) + mlp(norm_mlp(x))
    use_bias: bool = True
    qkv_bias: bool = False  # query / key / value biases even when use_bias is off (Qwen2)
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "bfloat16"  # compute dtype; params are always float32
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self):
        if isinstance(self.lora, dict):  # from a config dict or a run's config.json
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that rotary embedding rotates (even); the rest pass through."""
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def compute_dtype(self) -> Dtype:
        return jnp.dtype(self.dtype)


def matmul(eq: str, x: jax.Array, w: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
    """einsum in `dtype` with f32 accumulation, result cast to `out_dtype` (default `dtype`).

    The backward pass follows the same policy: the incoming gradient is cast to `dtype`, so both
    backward dots (dx, dw) also run as `dtype` x `dtype` -> f32. Plain autodiff would keep an f32
    cotangent (e.g. from f32 logits) and silently run those dots in f32, at a fraction of the speed.
    """
    dtype, out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype or dtype)
    return _mixed_einsum(eq, dtype, out_dtype)(x.astype(dtype), w.astype(dtype))


@functools.cache
def _mixed_einsum(eq: str, dtype: Dtype, out_dtype: Dtype):
    """einsum(eq) as a custom-VJP function whose forward and backward dots are dtype x dtype -> f32."""
    inputs, out = eq.split("->")
    x_sub, w_sub = inputs.split(",")

    def dot(spec, a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def f(x, w):
        return dot(eq, x, w).astype(out_dtype)

    def fwd(x, w):
        return f(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        g = g.astype(dtype)
        # `...` in x's subscripts (batch dims) also appears in the output, so both specs are well formed.
        dx = dot(f"{out},{w_sub}->{x_sub}", g, w).astype(x.dtype)
        dw = dot(f"{x_sub},{out}->{w_sub}", x, g).astype(w.dtype)
        return dx, dw

    f.defvjp(fwd, bwd)
    return f


class Dense(nn.Module):
    """y = x @ W (+ b) over the last axis; `axes` names W's logical axes (in, *out).

    With `lora` adapting this module's name: y = x @ W + (alpha / r) · (x @ A) @ B (+ b), A = `lora_a` [in, r],
    B = `lora_b` [r, *out] (Hu et al. 2021 eq. 3).
    """

    features: Sequence[int]
    axes: Sequence[str | None]
    use_bias: bool
    dtype: Dtype
    kernel_init: Any = nn.initializers.normal(0.02)
    out_dtype: Dtype | None = None  # e.g. float32 for logits
    lora: LoraConfig = LoraConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], *self.features)
        w = self.param("kernel", P(self.kernel_init, tuple(self.axes)), shape, jnp.float32)
        letters = "abcdefgh"[: len(self.features)]
        eq = f"...z,z{letters}->...{letters}"
        out_dtype = jnp.dtype(self.out_dtype or self.dtype)
        if not self.use_bias and not self.lora.adapts(self.name):
            return matmul(eq, x, w, self.dtype, out_dtype)
        y = matmul(eq, x, w, self.dtype, jnp.float32)
        if self.lora.adapts(self.name):
            y = y + lora_delta(self, "lora", x, eq, w.shape, self.axes, 1, self.lora, self.dtype)
        if not self.use_bias:
            return y.astype(out_dtype)
        b = self.param("bias", P(nn.initializers.zeros, tuple(self.axes[1:])), tuple(self.features), jnp.float32)
        return _add_bias(y, b, out_dtype)


def lora_delta(
    module: nn.Module, prefix: str, x: jax.Array, eq: str, shape, axes, n_in: int, lora: LoraConfig, dtype: Dtype
) -> jax.Array:
    """(alpha / r) · (x @ A) @ B in f32, for a weight W of `shape` (n_in input dims, then output dims) that `eq`
    applies to x. Creates `{prefix}_a` [*in, r] ~ N(0, 1 / fan_in) and `{prefix}_b` [r, *out] = 0, so the adapted
    layer starts equal to W; their logical axes are W's, with the rank axis unsharded."""
    r, fan_in = lora.rank, math.prod(shape[:n_in])
    a = module.param(
        f"{prefix}_a", P(nn.initializers.normal(fan_in**-0.5), (*axes[:n_in], None)), (*shape[:n_in], r), jnp.float32
    )
    b = module.param(f"{prefix}_b", P(nn.initializers.zeros, (None, *axes[n_in:])), (r, *shape[n_in:]), jnp.float32)
    inputs, out = eq.split("->")
    x_sub, w_sub = inputs.split(",")
    in_sub, out_sub = w_sub[:n_in], w_sub[n_in:]
    xa = matmul(f"{x_sub},{in_sub}r->{x_sub[:-n_in]}r", x, a, dtype)
    return lora.scale * matmul(f"{x_sub[:-n_in]}r,r{out_sub}->{out}", xa, b, dtype, jnp.float32)


def _add_bias(y_f32: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
    """(y + b) in f32, then cast: the bias gradient is then a sum of f32 values, which XLA:CPU fuses into
    the producer; a bf16 add made it upcast and tree-reduce every gradient in separate passes (~10%
    of a bf16 train step). The dot already accumulates in f32, so this also rounds once, not twice."""
    return (y_f32 + b).astype(dtype)


class Norm(nn.Module):
    """LayerNorm or RMSNorm, computed in f32."""

    kind: str
    eps: float
    use_bias: bool
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", P(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
        if self.kind == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps) * scale
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean((x32 - mean) ** 2, axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
            if self.use_bias:
                y = y + self.param("bias", P(nn.initializers.zeros, ("embed",)), (x.shape[-1],), jnp.float32)
        return y.astype(self.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Angular frequency [rotary_dim / 2] (radians per position) of each rotating pair, after `cfg.rope_scaling`."""
    d, s = cfg.rotary_dim, cfg.rope_scaling
    freqs = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if s.rope_type == "linear":
        return freqs / s.factor
    if s.rope_type == "llama3":
        # The blend weight is 0 at wavelength original_max_len / low_freq_factor and 1 at / high_freq_factor,
        # clipped outside that band: the piecewise rule of transformers' _compute_llama3_parameters.
        wavelen = 2 * jnp.pi / freqs
        blend = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blend = jnp.clip(blend, 0.0, 1.0)
        return (1 - blend) * freqs / s.factor + blend * freqs
    return freqs


def rotary(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, freqs: jax.Array) -> jax.Array:
    """Rotary position embedding, rotate-half convention (GPT-NeoX / LLaMA in HF layout).

    The first 2 * len(freqs) dims of each head rotate (partial rotary, GPT-NeoX's rotary_pct) at the angular
    frequencies `freqs` (see `rope_frequencies`); the remaining dims pass through unchanged.
    """
    d = 2 * freqs.shape[0]
    if d < x_BxTxHxD.shape[-1]:
        rotated = rotary(x_BxTxHxD[..., :d], positions_BxT, freqs)
        return jnp.concatenate([rotated, x_BxTxHxD[..., d:]], axis=-1)
    angles = positions_BxT[..., None].astype(jnp.float32) * freqs  # B,T,D/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxHxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxD.dtype)


class Attention(nn.Module):
    """Causal multi-head / grouped-query attention with an optional KV cache.

    Query token t sits in cache slot `cache_index + t`; it attends to key slot s
    when s <= that slot (and, with a sliding window W, s > that slot - W) and
    `key_mask[:, s]` is 1. Without a cache the slots are just 0..T-1, so prefill,
    decoding and training share one masking rule.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, cache=None, cache_index=None, deterministic=True):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, kvh, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = Dense((h, hd), ("embed", "heads", "kv"), qkv_bias, dt, lora=cfg.lora, name="query")(x)
        k = Dense((kvh, hd), ("embed", "heads", "kv"), qkv_bias, dt, lora=cfg.lora, name="key")(x)
        v = Dense((kvh, hd), ("embed", "heads", "kv"), qkv_bias, dt, lora=cfg.lora, name="value")(x)
        if cfg.position == "rope":
            freqs = rope_frequencies(cfg)
            q, k = rotary(q, positions, freqs), rotary(k, positions, freqs)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

        # Keys and values as [B, kv_heads, S, head_dim]: the cache's layout, so a decode step appends
        # one contiguous row per head and both attention dots read S-contiguous operands.
        B, T = x.shape[:2]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=2)
            cache = {"k": k, "v": v}
            q_slots = cache_index + jnp.arange(T)
        else:
            q_slots = jnp.arange(T)
        k_slots = jnp.arange(k.shape[2])[None, :]
        causal = k_slots <= q_slots[:, None]  # T,S
        if cfg.sliding_window:
            causal &= k_slots > q_slots[:, None] - cfg.sliding_window
        allowed = causal[None] & (key_mask[:, None, :] > 0)  # B,T,S

        # Grouped-query attention: q heads are split into kvh groups sharing one k/v head. The dots run
        # in the dtype the keys are held in (the compute dtype, or the cache's; see `init_cache`).
        adt = k.dtype
        qg = q.reshape(B, T, kvh, h // kvh, hd).astype(adt)
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(hd))
        # A large finite negative (not -inf) keeps fully masked rows (left pads) finite.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(adt), v, preferred_element_type=jnp.float32)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, h, hd).astype(dt)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        w = self.param(
            "out",
            P(nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5), ("heads", "kv", "embed")),
            (h, hd, cfg.d_model),
            jnp.float32,
        )
        if not cfg.use_bias and not cfg.lora.adapts("out"):
            return matmul("bthd,hde->bte", out, w, dt), cache
        y = matmul("bthd,hde->bte", out, w, dt, jnp.float32)
        if cfg.lora.adapts("out"):
            y = y + lora_delta(
                self, "out_lora", out, "bthd,hde->bte", w.shape, ("heads", "kv", "embed"), 2, cfg.lora, dt
            )
        if not cfg.use_bias:
            return y.astype(dt), cache
        b = self.param("out_bias", P(nn.initializers.zeros, ("embed",)), (cfg.d_model,), jnp.float32)
        return _add_bias(y, b, dt), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        out_init = nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5)
        if cfg.mlp == "swiglu":
            gate = Dense((cfg.ff_dim,), ("embed", "mlp"), cfg.use_bias, dt, lora=cfg.lora, name="gate")(x)
            up = Dense((cfg.ff_dim,), ("embed", "mlp"), cfg.use_bias, dt, lora=cfg.lora, name="up")(x)
            hidden = nn.silu(gate.astype(jnp.float32)).astype(dt) * up
        else:
            up = Dense((cfg.ff_dim,), ("embed", "mlp"), cfg.use_bias, dt, lora=cfg.lora, name="up")(x)
            hidden = nn.gelu(up.astype(jnp.float32), approximate=cfg.mlp == "gelu").astype(dt)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return Dense((cfg.d_model,), ("mlp", "embed"), cfg.use_bias, dt, out_init, lora=cfg.lora, name="down")(hidden)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with `parallel_residual`
    both branches read the block's input: x + attn(norm_attn(x)) + mlp(norm_mlp(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, cache=None, cache_index=None, deterministic=True):
        cfg = self.cfg
        norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype, name=name)
        a, cache = Attention(cfg, name="attn")(
            norm("norm_attn")(x), positions, key_mask, cache, cache_index, deterministic
        )
        a = nn.Dropout(cfg.dropout)(a, deterministic=deterministic)
        m = MLP(cfg, name="mlp")(norm("norm_mlp")(x if cfg.parallel_residual else x + a))
        x = x + a + nn.Dropout(cfg.dropout)(m, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache
