"""Export our params to a Hugging Face directory: config.json + model.safetensors (float32).

Policies (pretrain / SFT / PPO) become the family's ...ForCausalLM (GPT2LMHeadModel for GPT-2);
reward models become ...ForSequenceClassification with num_labels=1.

Preserved: every trunk and LM-head weight, so HF logits equal ours (tested to 1e-4 in f32), with LoRA
adapters merged into the weights they adapt;
the tokenizer's bos/eos/pad ids go into config.json and its file is copied beside the weights.
Not preserved: the value head; optimizer state; our chat template. For a reward model, HF's score
layer has no bias: the score weight is our reward kernel times the normalisation gain, and the
constant gain · bias + norm_bias is written to config.json as `rlhf_jax_reward_offset` — HF's
logit plus that offset is the normalised reward our PPO stage uses (HF itself ignores the field;
the offset does not change any comparison). HF reads the score at the last non-pad token
(`pad_token_id`); ours reads it at the last real token — the same unless a pad id occurs inside
the text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from rlhf_jax import lora
from rlhf_jax.hf import layout
from rlhf_jax.models.layers import ModelConfig

KINDS = ("lm", "reward")


def hf_tensors(params: Mapping, cfg: ModelConfig, family: str, kind: str = "lm") -> dict[str, np.ndarray]:
    """HF tensor name → float32 array for our `params` (trunk + lm_head, or trunk + reward_head)."""
    params = lora.merged(params, cfg)  # LoRA adapters folded into their weights: W + (alpha / r) · A @ B
    table = layout.weight_table(cfg, family, lm_head=kind == "lm", reward_head=kind == "reward")
    groups: dict[str, list[tuple[layout.Source, np.ndarray]]] = {}
    for path, src in table.items():
        leaf = params
        for k in path:
            if k not in leaf:
                raise KeyError(f"params have no {'/'.join(path)}; is this a {kind} model with config {cfg}?")
            leaf = leaf[k]
        groups.setdefault(src.name, []).append((src, np.asarray(jax.device_get(leaf), np.float32)))
    out = {}
    for name, parts in groups.items():
        src0, leaf0 = parts[0]
        n_in = math.prod(leaf0.shape[: src0.n_in])
        n_out = sum(math.prod(x.shape[s.n_in :]) for s, x in parts)
        mat = np.zeros((n_in, n_out), np.float32)  # [in, out]; every column is written once below
        start = 0
        for src, x in parts:
            cols = x.reshape(n_in, -1)
            idx = src.out_index if src.out_index is not None else np.arange(start, start + cols.shape[1])
            mat[:, idx] = cols
            start += cols.shape[1]
        if src0.n_in == 0:
            out[name] = mat[0]
        else:
            out[name] = np.ascontiguousarray(mat.T if src0.out_first else mat)
    return out


def export(
    params: Mapping,
    cfg: ModelConfig,
    out_dir: str,
    kind: str = "lm",
    family: str | None = None,
    tokenizer=None,
    reward_norm: Mapping[str, float] | None = None,
) -> str:
    """Writes `params` (one model's tree: trunk, lm_head / reward_head) as an HF directory; returns out_dir.

    family: gpt2 | neox | llama | mistral | qwen2; default: the one `cfg`'s architecture is (an error if none).
    reward_norm: {"gain", "bias"} of the RM (reward_norm.json), folded into the export (module docstring).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS}.")
    fam = layout.family_for(cfg)
    if family is not None and family != fam:
        raise ValueError(f"family={family!r} does not match the model's architecture, which is {fam!r}.")
    tensors = hf_tensors(params, cfg, fam, kind)
    arch = (layout.CAUSAL_LM if kind == "lm" else layout.SEQ_CLS)[fam]
    config = layout.hf_config(cfg, fam, arch)
    config.update(dtype="float32", torch_dtype="float32")  # the key of transformers >= 5, and of older ones
    if kind == "reward":
        gain, bias = (reward_norm or {}).get("gain", 1.0), (reward_norm or {}).get("bias", 0.0)
        tensors["score.weight"] = tensors["score.weight"] * np.float32(gain)
        head_bias = float(np.asarray(jax.device_get(params["reward_head"]["bias"])).reshape(-1)[0])
        config.update(
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            **{layout.REWARD_OFFSET_KEY: gain * head_bias + bias},
        )
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        name = "tokenizer.json" if getattr(tokenizer, "kind", "sentencepiece") == "hf" else "tokenizer.model"
        shutil.copyfile(tokenizer.path, os.path.join(out_dir, name))
        special = os.path.join(os.path.dirname(tokenizer.path), "tokenizer_config.json")
        if name == "tokenizer.json" and os.path.exists(special):
            shutil.copyfile(special, os.path.join(out_dir, "tokenizer_config.json"))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
