"""The decoder-only transformer and its heads, on one params tree.

    params = {"trunk": {...}, "lm_head": {...}, "value_head": {...}, "reward_head": {...}}

(`lm_head` is absent with tied embeddings: logits then reuse `trunk/embed`.)
A stage asks `apply` for the heads it needs; all of them exist after `init`.

Inputs are explicit so that left-padded batches work:
  tokens [B, T] int32, positions [B, T] int32, key_mask [B, S] (1 = real token;
  S = T without a cache, S = cache length with one).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.layers import Block, Dense, ModelConfig, Norm, P, matmul

HEADS = ("lm", "value", "reward")


class Trunk(nn.Module):
    """Embeddings, N blocks and the final norm: tokens → hidden states [B, T, D]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = self.param(
            "embed", P(nn.initializers.normal(0.02), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), jnp.float32
        )
        if cfg.position == "learned":
            self.pos_embed = self.param(
                "pos_embed", P(nn.initializers.normal(0.01), (None, "embed")), (cfg.max_len, cfg.d_model), jnp.float32
            )
        block = Block
        if cfg.remat != "none":
            policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
            block = nn.remat(Block, policy=policy, static_argnums=(6,))
        self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
        self.norm_final = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype)
        self.drop = nn.Dropout(cfg.dropout)

    def __call__(self, tokens, positions, key_mask, cache=None, cache_index=None, deterministic=True):
        cfg = self.cfg
        # Gather from the whole table (FSDP all-gathers every weight before use anyway): a gather from a
        # sharded table into a batch-sharded output makes XLA's SPMD partitioner fall back to full copies.
        table = nn.with_logical_constraint(self.embed, (None, None))
        x = jnp.take(table, tokens, axis=0)
        if cfg.position == "learned":
            x = x + jnp.take(nn.with_logical_constraint(self.pos_embed, (None, None)), positions, axis=0)
        x = self.drop(x.astype(cfg.compute_dtype), deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = block(x, positions, key_mask, layer_cache, cache_index, deterministic)
            new_cache.append(layer_cache)
        return self.norm_final(x), (new_cache if cache is not None else None)

    def attend(self, hidden):
        """Tied output embedding: hidden [B,T,D] → logits [B,T,V] in f32."""
        return matmul("btd,vd->btv", hidden, self.embed, self.cfg.compute_dtype, jnp.float32)


class ScalarHead(nn.Module):
    """hidden [B,T,D] → [B,T] scalars (values or rewards), in f32."""

    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, hidden):
        w = self.param("kernel", P(self.kernel_init, ("embed", None)), (hidden.shape[-1], 1), jnp.float32)
        b = self.param("bias", P(nn.initializers.zeros, (None,)), (1,), jnp.float32)
        return (hidden.astype(jnp.float32) @ w + b)[..., 0]


class TransformerLM(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.trunk = Trunk(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Dense(
                (cfg.vocab_size,), ("embed", "vocab"), False, cfg.compute_dtype, out_dtype=jnp.float32, lora=cfg.lora
            )
        # Value head starts at zero (lm-human-preferences); reward head ~ N(0, 1/sqrt(D+1)).
        self.value_head = ScalarHead(nn.initializers.zeros)
        self.reward_head = ScalarHead(nn.initializers.normal(1.0 / (cfg.d_model + 1) ** 0.5))

    def __call__(
        self,
        tokens,
        positions,
        key_mask,
        cache=None,
        cache_index=None,
        deterministic: bool = True,
        heads: Sequence[str] = ("lm",),
    ):
        """Returns {"hidden", "cache", and per requested head "logits" | "values" | "rewards"}."""
        hidden, cache = self.trunk(tokens, positions, key_mask, cache, cache_index, deterministic)
        out = {"hidden": hidden, "cache": cache}
        if "lm" in heads:
            logits = self.trunk.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
            out["logits"] = nn.with_logical_constraint(
                mask_padded_vocab(logits, self.cfg), ("batch", "length", "vocab")
            )
        if "value" in heads:
            out["values"] = self.value_head(hidden)
        if "reward" in heads:
            out["rewards"] = self.reward_head(hidden)
        return out


def mask_padded_vocab(logits, cfg: ModelConfig):
    """Logits [..., V] with the rows past the tokenizer's vocabulary (a padded vocab_size) at -1e9: probability
    exactly 0. -1e9, not -inf: exp() of it is 0, and 0 · logit stays 0 in the entropy (0 · -inf is NaN)."""
    if 0 < cfg.token_vocab < cfg.vocab_size:
        return jnp.where(jnp.arange(cfg.vocab_size) < cfg.token_vocab, logits, -1e9)
    return logits


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> list[dict[str, jax.Array]]:
    """An empty KV cache: per layer k, v of shape [B, kv_heads, S, head_dim].

    `dtype` defaults to the compute dtype, except on CPU, where it is float32: XLA:CPU runs batched
    bf16 dots by converting their operands to f32, which for a bf16 cache means converting the whole
    cache at every decoding step (measured on the benchmark shape: 2.02 s vs 2.29 s per 64x64 tokens).
    """
    if dtype is None:
        dtype = jnp.float32 if jax.default_backend() == "cpu" else cfg.compute_dtype
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def positions_from_mask(mask_BxT: jax.Array) -> jax.Array:
    """Position ids that count only real tokens, so left pads do not shift positions."""
    return jnp.maximum(jnp.cumsum(mask_BxT, axis=-1) - 1, 0).astype(jnp.int32)
