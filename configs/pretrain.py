"""Stage 1: causal-LM pretraining.

    python -m rlhf_jax.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny
    python -m rlhf_jax.main --config=configs/pretrain.py --workdir=runs/pretrain
    python -m rlhf_jax.main --config=configs/pretrain.py:shakespeare_char \
        --config.data.path=../shared/data/tinyshakespeare.txt --workdir=runs/shakespeare_char

Presets: tiny (seconds, built-in corpus), default (a small GPT on the built-in
corpus, minutes on 2 CPU cores), shakespeare_char (nanoGPT's CPU "baby GPT").
"""

from rlhf_jax.config import base_config, tiny_preset
from rlhf_jax.errors import ConfigError


def get_config(preset: str = "default"):
    c = base_config()
    c.stage = "pretrain"
    c.data.path = ""  # a local text file; empty: the built-in corpus, generated into the workdir
    c.data.builtin_chars = 400_000
    c.data.seq_len = 128
    c.data.val_fraction = 0.1
    c.batch_size, c.num_steps = 32, 2000
    c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.1, b2=0.99)
    c.eval_every, c.log_every = 500, 50

    if preset == "tiny":
        tiny_preset(c, seq_len=32)
        c.data.builtin_chars = 40_000
    elif preset == "shakespeare_char":
        # nanoGPT config/train_shakespeare_char.py with its CPU override: 4 layers, 4 heads,
        # 128 wide, block 64, batch 12, 2000 iters, lr 1e-3 cosine to 1e-4, no dropout.
        c.data.tokenizer_type, c.data.vocab_size = "char", 128
        c.data.seq_len = 64
        c.model.update(d_model=128, n_layers=4, n_heads=4, max_len=64, dropout=0.0)
        c.batch_size, c.num_steps = 12, 2000
        c.optim.update(lr=1e-3, warmup_steps=100, final_lr_fraction=0.1, b2=0.99, weight_decay=0.1)
        c.eval_every, c.eval_batches, c.log_every = 250, 0, 100
    elif preset != "default":
        raise ConfigError(f"configs/pretrain.py: unknown preset {preset!r}; use tiny, default or shakespeare_char.")
    return c
