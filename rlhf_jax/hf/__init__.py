"""Hugging Face checkpoints in and out: GPT-2, GPT-NeoX (Pythia), LLaMA, Mistral and Qwen2, as local directories
(config.json + model.safetensors, or a sharded model.safetensors.index.json). Needs numpy and
safetensors only; `transformers` is used by the parity tests, never here.

    model, params = hf.load_model("/models/pythia-160m", mesh, rules, dtype="float32")  # no random init
    params = hf.load_params("/models/pythia-160m", params_like)   # or into an existing tree's shardings
    hf.export(params, model.cfg, "out/pythia-sft", tokenizer=tok)

`config.init_from=<HF dir>` starts a stage from such a directory; `python -m rlhf_jax.convert`
converts in either direction.
"""

from rlhf_jax.hf.export import export, hf_tensors
from rlhf_jax.hf.layout import FAMILIES, family_for, is_hf_dir, model_fields, read_config
from rlhf_jax.hf.load import load_model, load_params, model_config, reward_offset

__all__ = [
    "FAMILIES",
    "export",
    "family_for",
    "hf_tensors",
    "is_hf_dir",
    "load_model",
    "load_params",
    "model_config",
    "model_fields",
    "read_config",
    "reward_offset",
]
