"""How a Hugging Face checkpoint maps onto this project's model: config fields and weight names.

Five families are supported, each in its own HF layout:

  gpt2   GPT2LMHeadModel: learned positions, LayerNorm, tanh gelu ("gelu_new"), fused c_attn.
         Conv1D weights are stored [in, out].
  neox   GPTNeoXForCausalLM (Pythia): rotary on the first rotary_pct of each head, LayerNorm,
         exact gelu, parallel residual, untied embed_out. query_key_value is fused per head:
         its output rows are laid out [heads, 3 (q, k, v), head_dim]. Linear weights are [out, in].
  llama  LlamaForCausalLM: rotary, RMSNorm, SwiGLU, grouped-query attention, separate q/k/v/o.
  mistral  MistralForCausalLM: LLaMA's layout, no biases, and a sliding attention window.
  qwen2  Qwen2ForCausalLM (Qwen2, Qwen2.5): LLaMA's layout with biases on q/k/v only.

The rotary families accept rope scaling "linear" and "llama3" (Llama 3.1+), read from `rope_parameters`
(transformers >= 5) or the older `rope_scaling`.

Each of our param leaves is read from one HF tensor by a `Source`; the same table drives import
(`rlhf_jax.hf.load`) and export (`rlhf_jax.hf.export`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.errors import ConfigError
from rlhf_jax.models.layers import ROPE_TYPES, ModelConfig, RopeScaling

FAMILIES = ("gpt2", "neox", "llama", "mistral", "qwen2")
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # one tensor layout; they differ in biases and attention window
MODEL_TYPES = {"gpt2": "gpt2", "gpt_neox": "neox", "llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
PREFIX = {"gpt2": "transformer.", "neox": "gpt_neox.", **dict.fromkeys(LLAMA_LIKE, "model.")}
CAUSAL_LM = {
    "gpt2": "GPT2LMHeadModel",
    "neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SEQ_CLS = {
    "gpt2": "GPT2ForSequenceClassification",
    "neox": "GPTNeoXForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
}
# HF's score layer has no bias; our reward head does. Export writes the constant here (see export.py).
REWARD_OFFSET_KEY = "rlhf_jax_reward_offset"
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our leaves lives in the HF checkpoint.

    Our leaf's first `n_in` axes flatten to HF's input dim and the rest to its output dim
    (vectors: n_in = 0). `out_first`: HF stores [out, in] (torch Linear, embed_out) rather than
    [in, out] (GPT-2 Conv1D, embedding tables). `out_index`: for a fused tensor, the HF output
    position of each of our flattened output positions.
    """

    name: str
    n_in: int
    out_first: bool = False
    out_index: np.ndarray | None = dataclasses.field(default=None, compare=False)


def is_hf_dir(path: str) -> bool:
    """A local HF model directory: config.json beside model.safetensors or a sharded index."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))
    )


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; point at a local Hugging Face model directory (config.json + model.safetensors)."
        )
    with open(path) as f:
        return json.load(f)


def is_sequence_classifier(hf: dict) -> bool:
    """A ...ForSequenceClassification checkpoint (a reward model): its score.weight fills reward_head."""
    return any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])


def family_of(hf: dict, where: str = "config.json") -> str:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type={mt!r} is not supported. Supported: {sorted(MODEL_TYPES)} "
            f"(GPT-2, GPT-NeoX/Pythia, LLaMA, Mistral, Qwen2/Qwen2.5)."
        )
    return MODEL_TYPES[mt]


def _unsupported(where: str, field: str, value, supported: str):
    raise ConfigError(f"{where}: {field}={value!r} is not supported; supported: {supported}.")


def _rope(hf: dict, where: str) -> tuple[float, float, dict]:
    """(rope_theta, rotary fraction, our RopeScaling as a dict) from transformers>=5 `rope_parameters` or the older
    top-level keys and `rope_scaling` (which, as in transformers, wins when both are given)."""
    rp = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    pct = rp.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 1.0)))
    if rope_type not in ROPE_TYPES:
        _unsupported(where, "rope_type", rope_type, f"{ROPE_TYPES} (rope_parameters / rope_scaling)")
    needs = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    missing = [k for k in needs[rope_type] if k not in rp]
    if missing:
        raise ConfigError(f"{where}: rope_type={rope_type!r} needs {missing} in rope_parameters (or rope_scaling).")
    scaling = RopeScaling(rope_type, **{k: float(rp[k]) for k in needs[rope_type]})
    if rope_type == "llama3":
        original = rp.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        scaling = dataclasses.replace(scaling, original_max_len=int(original))
    return float(theta), float(pct), dataclasses.asdict(scaling)


def _sliding_window(hf: dict, where: str) -> int:
    """The attention window of every layer (0: none): Mistral's `sliding_window`, or Qwen2's when
    `use_sliding_window` puts it on every layer (from `max_window_layers` on, or as `layer_types` lists them).
    A Qwen2 window on only some layers is refused unless it is no shorter than max_position_embeddings."""
    window = hf.get("sliding_window") or 0
    if hf["model_type"] == "mistral" or not window:
        return window
    first, max_len = hf.get("max_window_layers", 28), hf.get("max_position_embeddings", 2048)
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])
    ]
    sliding = [bool(hf.get("use_sliding_window")) and t == "sliding_attention" for t in types]
    if all(sliding):
        return window
    if any(sliding) and window < max_len:
        _unsupported(
            where,
            "use_sliding_window",
            True,
            f"false, or a window on every layer (max_window_layers=0; here {first}, so layer_types={types}), "
            f"or a sliding_window >= max_position_embeddings ({max_len}; here {window}): per-layer windows are "
            f"not implemented",
        )
    return 0


def model_fields(hf: dict, where: str = "config.json") -> dict:
    """The architecture fields of our ModelConfig that reproduce the HF model in `hf` (config.json).
    Runtime fields (dtype, dropout, remat) are left to the caller."""
    fam = family_of(hf, where)
    if fam == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in (*_TANH_GELU, "gelu"):
            _unsupported(where, "activation_function", act, f"{_TANH_GELU} or 'gelu'")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            _unsupported(
                where,
                "scale_attn_by_inverse_layer_idx / scale_attn_weights",
                (hf.get("scale_attn_by_inverse_layer_idx"), hf.get("scale_attn_weights")),
                "(false, true)",
            )
        return dict(
            vocab_size=hf["vocab_size"],
            d_model=hf["n_embd"],
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            n_kv_heads=0,
            d_ff=hf.get("n_inner") or 0,
            max_len=hf["n_positions"],
            position="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            mlp="gelu" if act in _TANH_GELU else "gelu_exact",
            use_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            parallel_residual=False,
            rotary_pct=1.0,
            rope_scaling=dataclasses.asdict(RopeScaling()),
            sliding_window=0,
            qkv_bias=False,
        )
    theta, pct, scaling = _rope(hf, where)
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim", d // heads) != d // heads:
        _unsupported(where, "head_dim", hf["head_dim"], f"hidden_size / num_attention_heads = {d // heads}")
    common = dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        position="rope",
        rope_theta=theta,
        rotary_pct=pct,
        rope_scaling=scaling,
        sliding_window=_sliding_window(hf, where) if fam in ("mistral", "qwen2") else 0,
    )
    if fam == "neox":
        act = hf.get("hidden_act", "gelu")
        if act not in (*_TANH_GELU, "gelu"):
            _unsupported(where, "hidden_act", act, f"'gelu' or {_TANH_GELU}")
        if not hf.get("attention_bias", True):
            _unsupported(where, "attention_bias", False, "true (GPT-NeoX's MLP and norms always have biases)")
        return dict(
            common,
            n_kv_heads=0,
            norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            mlp="gelu_exact" if act == "gelu" else "gelu",
            use_bias=True,
            qkv_bias=False,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            parallel_residual=hf.get("use_parallel_residual", True),
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _unsupported(where, "hidden_act", act, "'silu' (SwiGLU)")
    if fam == "llama" and hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        _unsupported(
            where,
            "attention_bias / mlp_bias",
            (hf.get("attention_bias"), hf.get("mlp_bias")),
            "both false or both true (one use_bias flag)",
        )
    if pct != 1.0:
        _unsupported(where, "partial_rotary_factor", pct, "1.0 for LLaMA, Mistral and Qwen2")
    # transformers hard-codes the biases of Mistral (none) and Qwen2 (on q/k/v only); LLaMA's are configurable.
    return dict(
        common,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        use_bias=fam == "llama" and bool(hf.get("attention_bias", False)),
        qkv_bias=fam == "qwen2",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        parallel_residual=False,
    )


def family_for(cfg: ModelConfig) -> str:
    """The HF family whose architecture `cfg` is; a clear error when none matches exactly."""
    if cfg.position == "learned" and cfg.norm == "layernorm" and cfg.mlp != "swiglu":
        fam = "gpt2"
    elif cfg.position == "rope" and cfg.norm == "layernorm" and cfg.mlp != "swiglu":
        fam = "neox"
    elif cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        fam = "qwen2" if cfg.qkv_bias and not cfg.use_bias else "mistral" if cfg.sliding_window else "llama"
    else:
        raise ConfigError(
            f"model (position={cfg.position!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}) matches no HF "
            f"family: gpt2 = learned + layernorm + gelu, neox = rope + layernorm + gelu, "
            f"llama / mistral / qwen2 = rope + rmsnorm + swiglu (mistral: a sliding_window, qwen2: qkv_bias)."
        )
    problems = []
    if fam in ("gpt2", "neox") and not cfg.use_bias:
        problems.append("use_bias=False (GPT-2 and GPT-NeoX have biases)")
    if fam in ("gpt2", "neox") and cfg.kv_heads != cfg.n_heads:
        problems.append(f"n_kv_heads={cfg.n_kv_heads} (grouped-query attention is LLaMA-only)")
    if fam == "gpt2" and cfg.parallel_residual:
        problems.append("parallel_residual=True (GPT-2 is sequential)")
    if fam in ("gpt2", "neox") and cfg.sliding_window:
        problems.append(f"sliding_window={cfg.sliding_window} (only Mistral and Qwen2 have one)")
    if fam in LLAMA_LIKE and (cfg.parallel_residual or cfg.rotary_pct != 1.0):
        problems.append("parallel_residual / rotary_pct != 1 (LLaMA, Mistral and Qwen2 have neither)")
    if fam == "mistral" and cfg.use_bias:
        problems.append("use_bias=True with a sliding_window (Mistral has no biases)")
    if problems:
        raise ConfigError(f"model cannot be written as {fam}: " + "; ".join(problems) + ".")
    return fam


def hf_config(cfg: ModelConfig, family: str, architecture: str) -> dict:
    """config.json for `cfg` in `family` (the inverse of `model_fields`)."""
    if family == "gpt2":
        return dict(
            architectures=[architecture],
            model_type="gpt2",
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.ff_dim,
            n_positions=cfg.max_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new" if cfg.mlp == "gelu" else "gelu",
            attn_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            resid_pdrop=cfg.dropout,
            scale_attn_weights=True,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    scaling = cfg.rope_scaling
    rope = dict(rope_type=scaling.rope_type, rope_theta=cfg.rope_theta)
    if scaling.rope_type != "default":
        rope.update(factor=scaling.factor)
    if scaling.rope_type == "llama3":
        rope.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_len,
        )
    common = dict(
        architectures=[architecture],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ff_dim,
        max_position_embeddings=cfg.max_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout,
    )
    if family == "neox":
        return dict(
            common,
            model_type="gpt_neox",
            layer_norm_eps=cfg.norm_eps,
            hidden_act="gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
            rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rope_theta,
            rope_parameters=dict(rope, partial_rotary_factor=cfg.rotary_pct),
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=True,
            hidden_dropout=cfg.dropout,
        )
    llama_like = dict(
        common,
        model_type=family,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        rope_parameters=rope,
    )
    if family == "mistral":
        return dict(llama_like, sliding_window=cfg.sliding_window or None)
    if family == "qwen2":  # a window, when there is one, on every layer (from layer max_window_layers = 0 on)
        window = dict(sliding_window=cfg.sliding_window, max_window_layers=0) if cfg.sliding_window else {}
        return dict(llama_like, use_sliding_window=bool(cfg.sliding_window), **window)
    return dict(llama_like, attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)


def weight_table(
    cfg: ModelConfig, family: str, lm_head: bool = True, reward_head: bool = False
) -> dict[tuple[str, ...], Source]:
    """Our param path (e.g. ("trunk", "block_0", "attn", "query", "kernel")) → its HF Source."""
    h, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    pre = PREFIX[family]
    t: dict[tuple[str, ...], Source] = {}

    def vec_and_norm(ours, name):  # LayerNorm / RMSNorm: scale (+ bias)
        t[(*ours, "scale")] = Source(pre + name + ".weight", 0)
        if cfg.norm == "layernorm":
            t[(*ours, "bias")] = Source(pre + name + ".bias", 0)

    def dense(ours, name, n_in, out_first, out_index=None, bias=cfg.use_bias, kernel="kernel", bias_key="bias"):
        t[(*ours, kernel)] = Source(pre + name + ".weight", n_in, out_first, out_index)
        if bias:
            t[(*ours, bias_key)] = Source(pre + name + ".bias", 0, False, out_index)

    emb = {"gpt2": "wte", "neox": "embed_in", **dict.fromkeys(LLAMA_LIKE, "embed_tokens")}[family]
    t[("trunk", "embed")] = Source(pre + emb + ".weight", 1)
    if family == "gpt2":
        t[("trunk", "pos_embed")] = Source(pre + "wpe.weight", 1)
    vec_and_norm(
        ("trunk", "norm_final"),
        {"gpt2": "ln_f", "neox": "final_layer_norm", **dict.fromkeys(LLAMA_LIKE, "norm")}[family],
    )

    flat = np.arange(h * hd)
    for i in range(cfg.n_layers):
        b = ("trunk", f"block_{i}")
        attn, mlp = (*b, "attn"), (*b, "mlp")
        if family == "gpt2":
            L = f"h.{i}."
            vec_and_norm((*b, "norm_attn"), L + "ln_1")
            vec_and_norm((*b, "norm_mlp"), L + "ln_2")
            for j, name in enumerate(("query", "key", "value")):  # c_attn output = [q | k | v]
                dense((*attn, name), L + "attn.c_attn", 1, False, flat + j * d)
            dense(attn, L + "attn.c_proj", 2, False, kernel="out", bias_key="out_bias")
            dense((*mlp, "up"), L + "mlp.c_fc", 1, False)
            dense((*mlp, "down"), L + "mlp.c_proj", 1, False)
        elif family == "neox":
            L = f"layers.{i}."
            vec_and_norm((*b, "norm_attn"), L + "input_layernorm")
            vec_and_norm((*b, "norm_mlp"), L + "post_attention_layernorm")
            head, dim = np.divmod(flat, hd)
            for j, name in enumerate(("query", "key", "value")):  # rows = [head, (q, k, v), head_dim]
                dense((*attn, name), L + "attention.query_key_value", 1, True, (head * 3 + j) * hd + dim)
            dense(attn, L + "attention.dense", 2, True, kernel="out", bias_key="out_bias")
            dense((*mlp, "up"), L + "mlp.dense_h_to_4h", 1, True)
            dense((*mlp, "down"), L + "mlp.dense_4h_to_h", 1, True)
        else:
            L = f"layers.{i}."
            vec_and_norm((*b, "norm_attn"), L + "input_layernorm")
            vec_and_norm((*b, "norm_mlp"), L + "post_attention_layernorm")
            for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                dense((*attn, name), L + f"self_attn.{proj}", 1, True, bias=cfg.use_bias or cfg.qkv_bias)
            dense(attn, L + "self_attn.o_proj", 2, True, kernel="out", bias_key="out_bias")
            for name in ("gate", "up", "down"):
                dense((*mlp, name), L + f"mlp.{name}_proj", 1, True)
    if lm_head and not cfg.tie_embeddings:
        t[("lm_head", "kernel")] = Source("embed_out.weight" if family == "neox" else "lm_head.weight", 1, True)
    if reward_head:
        t[("reward_head", "kernel")] = Source("score.weight", 1, True)
    return t
