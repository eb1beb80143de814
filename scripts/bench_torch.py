"""The PyTorch side of scripts/bench.py: Hugging Face GPT2LMHeadModel, torch.optim.AdamW, `generate`.

Started by scripts/bench.py as a worker process (`--worker train|generate|peak --spec JSON`);
not meant to be run by hand. Shapes, optimiser settings and token ids come from bench_workloads.py,
so both systems see the same model, batch, sequence length and dtype policy:
float32, or f32 params with bf16 compute under `torch.autocast("cpu", dtype=torch.bfloat16)`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable

from bench_harness import full_length_sampling, serve
from bench_workloads import DTYPES, OPTIM, tokens_for


def _torch():
    import torch

    # The same cores JAX's CPU backend uses by default: all of them.
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def gpt2(s: dict, max_len: int):
    """GPT-2 with the shape of rlhf_jax's default ModelConfig family: learned positions, LayerNorm,
    tanh-GELU MLP of 4·d_model, biases, tied embeddings, no dropout."""
    torch = _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=s["vocab"],
        n_positions=max_len,
        n_embd=s["d_model"],
        n_layer=s["n_layers"],
        n_head=s["n_heads"],
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=s["vocab"] - 1,
        eos_token_id=s["vocab"] - 1,
        pad_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def autocast(dtype: str):
    torch = _torch()
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def torch_train(spec: dict) -> Callable[[], None]:
    torch = _torch()
    import torch.nn.functional as F

    s = spec["shape"]
    model = gpt2(s, s["seq_len"]).train()
    params = list(model.parameters())  # tied embeddings appear once
    # Decay matrices only, as rlhf_jax.optim.decay_mask does.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": OPTIM["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kw = dict(lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]), eps=OPTIM["eps"])
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kw)  # the fastest CPU implementation torch offers
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, **kw)
    tokens = torch.from_numpy(tokens_for(s, (s["batch"], s["seq_len"] + 1))).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast(spec["dtype"]):
            logits = model(input_ids=inputs).logits
        # Loss in f32, outside autocast, like rlhf_jax's forward.token_nll.
        loss = F.cross_entropy(logits.float().reshape(-1, s["vocab"]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["grad_clip_norm"])
        opt.step()
        value = loss.item()
        if value != value:
            raise FloatingPointError(f"train step loss is {value}")

    return run


def torch_generate(spec: dict) -> Callable[[], None]:
    torch = _torch()

    s = spec["shape"]
    B, P, N = s["batch"], s["prompt_len"], s["new_tokens"]
    model = gpt2(s, P + N).eval()
    prompt = torch.from_numpy(tokens_for(s, (B, P))).long()
    kw = full_length_sampling(torch.ones_like(prompt), s["temperature"], N, 0, eos_token_id=s["vocab"] - 1)

    def run():
        torch.manual_seed(0)
        with torch.inference_mode(), autocast(spec["dtype"]):
            out = model.generate(prompt, **kw)
        assert tuple(out.shape) == (B, P + N), tuple(out.shape)

    return run


def torch_peak(n: int = 2048, repeats: int = 5) -> dict:
    """{dtype: FLOP/s}: best of `repeats` n×n @ n×n matmuls (oneDNN/MKL accumulate bf16 in f32)."""
    torch = _torch()
    out = {"threads": torch.get_num_threads()}
    for dt in DTYPES:
        a = torch.ones(n, n, dtype=getattr(torch, dt))
        a @ a
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        out[dt] = 2.0 * n**3 / best
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", required=True, choices=("serve",))
    ap.add_argument("--spec", default="{}")
    ap.parse_args()
    import transformers  # noqa: F401  (import before saying hello, so imports are never timed)

    _torch()
    serve({"train": torch_train, "generate": torch_generate}, torch_peak)


if __name__ == "__main__":
    main()
