"""FLOP counts and this machine's measured peak, for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from rlhf_jax.models.layers import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6·N (matmul params) + 12·L·T·D (attention scores), PaLM appendix B."""
    d, f, L = cfg.d_model, cfg.ff_dim, cfg.n_layers
    attn = d * cfg.head_dim * (cfg.n_heads + 2 * cfg.kv_heads) + cfg.n_heads * cfg.head_dim * d
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * f
    n_matmul = L * (attn + mlp) + d * cfg.vocab_size  # lm head (tied or not) is a matmul
    return 6.0 * n_matmul + 12.0 * L * seq_len * d


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "bfloat16", n: int = 2048, repeats: int = 5) -> float:
    """Best observed FLOP/s over all local devices of one large square matmul in `dtype` (f32 accumulation)."""
    dt = jnp.dtype(dtype)
    x = jnp.ones((n, n), dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(x, x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x, x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    # On CPU, fake devices share the same cores: one matmul already uses all of them.
    devices = 1 if jax.default_backend() == "cpu" else jax.local_device_count()
    return 2.0 * n**3 / best * devices
