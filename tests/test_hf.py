"""Hugging Face checkpoints: tiny random GPT-2, GPT-NeoX (Pythia-style), LLaMA (also with Llama 3.1 rope
scaling), Mistral (with a sliding window shorter than the sequences) and Qwen2 (q/k/v biases, tied embeddings)
models built with `transformers` give our model the same logits (f32, max abs diff <= 1e-4), with left padding
and through KV-cache decoding; greedy decoding equals transformers' `generate`; export → reload in transformers
gives them back; a sharded load equals the replicated one."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch: pip install torch==2.13.0 (CPU build)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers: pip install -r requirements-parity.txt"
)

from rlhf_jax import hf, parallel, train_state  # noqa: E402
from rlhf_jax.models.gpt import TransformerLM, init_cache, positions_from_mask  # noqa: E402
from rlhf_jax.models.layers import RopeScaling  # noqa: E402
from rlhf_jax.sampling import SamplingSettings, sample  # noqa: E402

V, D, LAYERS, HEADS, FF, MAXLEN = 512, 64, 2, 4, 128, 64
ATOL = 1e-4
RULES = parallel.DEFAULT_RULES


# Llama 3.1's rope scaling, shrunk so that this model's 8 rotary frequencies fall in all three bands: wavelengths
# under 32 / 4 = 8 positions stay, over 32 / 1 are stretched 4x, and those between are blended.
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500.0,
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)
WINDOW = 4  # Mistral's sliding window: shorter than every test sequence


def _llama_like(config_cls, **kw):
    return config_cls(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=FF,
        max_position_embeddings=MAXLEN,
        rms_norm_eps=1e-5,
        **kw,
    )


def _hf_model(family: str):
    T = transformers
    if family == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=V,
            n_embd=D,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=MAXLEN,
            attn_pdrop=0.0,
            embd_pdrop=0.0,
            resid_pdrop=0.0,
        )
        return T.GPT2LMHeadModel(cfg)
    if family == "neox":
        cfg = T.GPTNeoXConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FF,
            max_position_embeddings=MAXLEN,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
        return T.GPTNeoXForCausalLM(cfg)
    if family == "qwen2":
        return T.Qwen2ForCausalLM(_llama_like(T.Qwen2Config, rope_theta=1000.0, tie_word_embeddings=True))
    if family == "mistral":
        return T.MistralForCausalLM(_llama_like(T.MistralConfig, sliding_window=WINDOW, tie_word_embeddings=False))
    if family == "llama3_rope":
        return T.LlamaForCausalLM(_llama_like(T.LlamaConfig, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False))
    return T.LlamaForCausalLM(_llama_like(T.LlamaConfig, rope_theta=500.0, tie_word_embeddings=False))


def _randomize(model, seed: int):
    """Weights of O(0.1) (norm scales around 1), so logits are O(1) and parity is not trivially small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_" in name else 0.15 * noise)
    return model.eval()


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
            position_ids=torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long),
        )
    return out.logits.float().numpy()


def _mesh(**axes):
    return parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, **axes})


def _batch(seed=0, B=3, T=12, pads=(0, 4, 7)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b, p in enumerate(pads):
        mask[b, :p], tokens[b, :p] = 0, 0
    return tokens, mask


def _forward(model, params, tokens, mask, heads=("lm",)):
    return model.apply(
        {"params": params}, jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask), heads=heads
    )


SEEDS = {"gpt2": 1, "neox": 2, "llama": 3, "qwen2": 7, "mistral": 8, "llama3_rope": 9}


@pytest.fixture(scope="module", params=list(SEEDS))
def case(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    ref = _randomize(_hf_model(family), seed=SEEDS[family])
    hf_dir = str(tmp_path_factory.mktemp(family))
    # LLaMA is saved in shards, so the safetensors index is read too.
    ref.save_pretrained(hf_dir, safe_serialization=True, **({"max_shard_size": "100KB"} if family == "llama" else {}))
    mesh = _mesh()
    model, params = hf.load_model(hf_dir, mesh, RULES, dtype="float32")
    tokens, mask = _batch()
    return dict(
        family=family,
        ref=ref,
        dir=hf_dir,
        model=model,
        params=params,
        mesh=mesh,
        tokens=tokens,
        mask=mask,
        hf_logits=_hf_logits(ref, tokens, mask),
    )


def _max_diff_real(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask) > 0].max())


def test_config_maps_the_family(case):
    cfg = case["model"].cfg
    want = {
        "gpt2": dict(position="learned", mlp="gelu", tie_embeddings=True),
        "neox": dict(position="rope", mlp="gelu_exact", rotary_pct=0.25, parallel_residual=True, tie_embeddings=False),
        "llama": dict(
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            n_kv_heads=2,
            rope_theta=500.0,
            use_bias=False,
            tie_embeddings=False,
        ),
        "qwen2": dict(n_kv_heads=2, rope_theta=1000.0, use_bias=False, qkv_bias=True, tie_embeddings=True),
        "mistral": dict(n_kv_heads=2, use_bias=False, qkv_bias=False, sliding_window=WINDOW, tie_embeddings=False),
        "llama3_rope": dict(
            rope_theta=500.0,
            rope_scaling=RopeScaling(
                "llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=32
            ),
            sliding_window=0,
        ),
    }[case["family"]]
    assert {k: getattr(cfg, k) for k in want} == want
    if case["family"] == "llama":
        assert os.path.exists(os.path.join(case["dir"], "model.safetensors.index.json"))


def test_logits_match_with_left_padding(case):
    with parallel.activate(case["mesh"], RULES):
        ours = jax.jit(lambda p: _forward(case["model"], p, case["tokens"], case["mask"])["logits"])(case["params"])
    diff = _max_diff_real(ours, case["hf_logits"], case["mask"])
    print(f"{case['family']} full-forward max abs diff {diff:.2e}")
    assert diff <= ATOL
    assert np.abs(case["hf_logits"]).max() > 1.0  # the comparison is not between near-zero logits


def test_kv_cache_decoding_matches_hf(case):
    """Prefill the left-padded first P tokens into a cache, then feed the rest one at a time."""
    model, params, tokens, mask = case["model"], case["params"], case["tokens"], case["mask"]
    B, T = tokens.shape
    P = 8
    key_mask = jnp.asarray(mask)
    positions = positions_from_mask(key_mask)

    def step(params, cache, tok, pos, index):
        out = model.apply({"params": params}, tok, pos, key_mask, cache=cache, cache_index=index)
        return out["logits"], out["cache"]

    with parallel.activate(case["mesh"], RULES):
        step = jax.jit(step)
        logits, cache = step(params, init_cache(model.cfg, B, T), tokens[:, :P], positions[:, :P], 0)
        got = [logits]
        for t in range(P, T):
            logits, cache = step(params, cache, tokens[:, t : t + 1], positions[:, t : t + 1], t)
            got.append(logits)
    got = np.concatenate([np.asarray(x) for x in got], axis=1)
    diff = _max_diff_real(got, case["hf_logits"], mask)
    print(f"{case['family']} KV-cache max abs diff {diff:.2e}")
    assert diff <= ATOL


def test_greedy_sampling_follows_hf_argmax(case):
    """sampling.sample (prefill + lax.scan decoding) with temperature 0 picks HF's argmax at every step, so
    it writes what transformers' greedy `generate` (with its own KV cache: a sliding one for Mistral) writes."""
    model, params = case["model"], case["params"]
    tokens, mask = _batch(seed=1, T=6, pads=(0, 2, 5))
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_id=-1, pad_id=0)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(0), tokens.shape[0]))
    with parallel.activate(case["mesh"], RULES):
        out = jax.jit(lambda p, t, m, k: sample(p, t, m, k, model=model, settings=settings))(params, tokens, mask, keys)
    new = np.asarray(out["tokens"])
    full, full_mask = np.concatenate([tokens, new], 1), np.concatenate([mask, np.ones_like(new)], 1)
    ref = _hf_logits(case["ref"], full, full_mask)
    np.testing.assert_array_equal(ref[:, tokens.shape[1] - 1 : -1].argmax(-1), new)
    # eos_token_id=V, an id no model here can produce: always 6 tokens, as with our eos_id=-1.
    greedy = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=V)
    with torch.no_grad():
        generated = case["ref"].generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            generation_config=greedy,
        )
    np.testing.assert_array_equal(generated[:, tokens.shape[1] :].numpy(), new)


def test_export_reloads_in_transformers(case, tmp_path):
    out = hf.export(case["params"], case["model"].cfg, str(tmp_path / "lm"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(case["ref"])
    diff = _max_diff_real(_hf_logits(again, case["tokens"], case["mask"]), case["hf_logits"], case["mask"])
    assert diff <= ATOL


def test_reward_model_exports_as_sequence_classifier(case, tmp_path):
    """Our reward (head with bias, then the normalisation gain and bias) equals HF's score + the offset
    written to config.json; importing that directory gives back the same reward head."""
    model, mesh = case["model"], case["mesh"]
    rng = np.random.default_rng(5)
    params = dict(
        case["params"],
        reward_head={
            "kernel": jnp.asarray(rng.normal(0, 0.3, (D, 1)), jnp.float32),
            "bias": jnp.asarray([0.7], jnp.float32),
        },
    )
    norm = {"gain": 1.5, "bias": -0.25}
    out = hf.export(params, model.cfg, str(tmp_path / "rm"), kind="reward", reward_norm=norm)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"][0].endswith("ForSequenceClassification") and cfg["num_labels"] == 1
    tokens, mask = case["tokens"][:, ::-1].copy(), case["mask"][:, ::-1].copy()  # right padding, pad id 0
    with parallel.activate(mesh, RULES):
        ours = jax.jit(lambda p: _forward(model, p, tokens, mask, heads=("reward",))["rewards"])(params)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    ours = norm["gain"] * np.asarray(ours)[np.arange(len(last)), last] + norm["bias"]
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(out, pad_token_id=0).eval()
    with torch.no_grad():
        theirs = (
            rm(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
            .logits[:, 0]
            .numpy()
        )
    np.testing.assert_allclose(theirs + cfg[hf.layout.REWARD_OFFSET_KEY], ours, atol=ATOL)
    back = hf.load_params(out, params)  # a sequence classifier fills reward_head
    np.testing.assert_allclose(back["reward_head"]["kernel"], norm["gain"] * params["reward_head"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(back["reward_head"]["bias"], [norm["gain"] * 0.7 + norm["bias"]], atol=1e-6)


def test_sharded_load_on_fsdp_tensor_mesh(case):
    """On data=2, fsdp=2, tensor=2 each device reads only its block (of GPT-2's [q | k | v] c_attn, NeoX's
    per-head fused qkv, LLaMA's grouped k/v heads); logits equal HF's."""
    mesh = _mesh(fsdp=2, tensor=2)
    model, params = hf.load_model(case["dir"], mesh, RULES, dtype="float32")
    with parallel.activate(mesh, RULES):
        ours = jax.jit(lambda p: _forward(model, p, case["tokens"], case["mask"])["logits"])(params)
    q = params["trunk"]["block_0"]["attn"]["query"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (D // 2, HEADS // 2, D // HEADS)
    assert _max_diff_real(ours, case["hf_logits"], case["mask"]) <= ATOL


def test_half_precision_checkpoints_load_as_float32(case, tmp_path):
    """Released checkpoints are often float16 / bfloat16: each loads as its exact float32 value."""
    for dtype in (torch.float16, torch.bfloat16):
        d = str(tmp_path / str(dtype))
        half = copy.deepcopy(case["ref"]).to(dtype)
        half.save_pretrained(d, safe_serialization=True)
        _, params = hf.load_model(d, case["mesh"], RULES)
        want = half.get_input_embeddings().weight.detach().float().numpy()
        np.testing.assert_array_equal(np.asarray(params["trunk"]["embed"]), want)


def test_linear_rope_scaling_from_legacy_rope_scaling_matches_hf(tmp_path):
    """{"type": "linear", "factor": 4} under the older `rope_scaling` key (as released Llama 2 / Vicuna configs
    hold it) loads as positions interpolated 4x; logits equal transformers' and the export keeps the scaling."""
    ref = _randomize(_hf_model("llama"), seed=10)
    ref.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 4.0})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert ref.config.rope_parameters["rope_type"] == "linear"
    mesh = _mesh()
    model, params = hf.load_model(str(tmp_path / "hf"), mesh, RULES, dtype="float32")
    assert model.cfg.rope_scaling == RopeScaling("linear", factor=4.0)
    tokens, mask = _batch()
    with parallel.activate(mesh, RULES):
        ours = jax.jit(lambda p: _forward(model, p, tokens, mask)["logits"])(params)
    want = _hf_logits(ref, tokens, mask)
    assert _max_diff_real(ours, want, mask) <= ATOL
    again = transformers.AutoModelForCausalLM.from_pretrained(hf.export(params, model.cfg, str(tmp_path / "out")))
    assert again.config.rope_parameters["factor"] == 4.0
    assert _max_diff_real(_hf_logits(again.eval(), tokens, mask), want, mask) <= ATOL


def test_bare_base_model_with_tied_embeddings_loads(tmp_path):
    """A checkpoint saved from LlamaModel (no "model." prefix, no head) with tied embeddings loads; its
    q_proj [heads * head_dim, d] lands as our query kernel [d, heads, head_dim]."""
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=FF,
        tie_word_embeddings=True,
    )
    base = _randomize(transformers.LlamaModel(cfg), seed=6)
    base.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = hf.load_model(str(tmp_path), _mesh(fsdp=2), RULES)
    assert model.cfg.tie_embeddings and set(params) == {"trunk"}
    q = base.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(
        params["trunk"]["block_0"]["attn"]["query"]["kernel"], q.T.reshape(D, HEADS, D // HEADS)
    )
    np.testing.assert_array_equal(params["trunk"]["embed"], base.embed_tokens.weight.detach().numpy())


def test_unsupported_checkpoints_fail_naming_the_field(tmp_path):
    base = json.loads(transformers.LlamaConfig(hidden_size=D, num_attention_heads=HEADS).to_json_string())
    for change, field in (
        (dict(model_type="bert"), "model_type='bert'"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), r"rope_type='yarn'.*'linear', 'llama3'"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), r"needs \['low_freq_factor'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(attention_bias=True), "attention_bias / mlp_bias"),
    ):
        with pytest.raises(ValueError, match=field):
            hf.model_fields(dict(base, **change))
    qwen2 = json.loads(
        transformers.Qwen2Config(
            hidden_size=D, num_attention_heads=HEADS, num_hidden_layers=2, max_position_embeddings=MAXLEN
        ).to_json_string()
    )
    window = dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=None)
    with pytest.raises(ValueError, match=r"config.json: use_sliding_window=True .*max_window_layers=0"):
        hf.model_fields(dict(qwen2, **window, max_window_layers=1))  # a window on the second layer only
    assert hf.model_fields(dict(qwen2, **window, max_window_layers=0))["sliding_window"] == WINDOW  # every layer
    assert hf.model_fields(dict(qwen2, **window, max_window_layers=2))["sliding_window"] == 0  # no layer
    (tmp_path / "config.json").write_text(json.dumps(base))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf.load_params(str(tmp_path), {})
    odd = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=61, n_embd=D, n_layer=1, n_head=HEADS))
    odd.save_pretrained(str(tmp_path / "odd"))
    with pytest.raises(ValueError, match=r"trunk/embed of shape \(61, 64\) cannot be split.*mesh.tensor=1"):
        hf.load_model(str(tmp_path / "odd"), _mesh(tensor=2), RULES)


@pytest.mark.slow
def test_sft_starts_from_an_hf_directory(tmp_path):
    """config.init_from=<HF dir>: the architecture comes from its config.json, the tokenizer is its
    tokenizer.json (chat roles as text), and training starts from its weights."""
    import sys

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlhf_jax import checkpoint, config as config_lib
    from rlhf_jax.data import tokenizer as tok_lib
    from rlhf_jax.stages import lm
    from rlhf_jax.tasks import builtin_text

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import sft as sft_cfg

    hf_dir = tmp_path / "neox"
    ref = _randomize(_hf_model("neox"), seed=4)
    ref.save_pretrained(str(hf_dir), safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train(
        [builtin_text.write_builtin_corpus(str(tmp_path / "corpus.txt"), num_chars=20_000)],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(hf_dir / "tokenizer.json"))

    c = sft_cfg.get_config("tiny")
    c.update(init_from=str(hf_dir), progress=False, num_steps=2, log_every=1, eval_every=2)
    c.data.chat_template = "hh"
    c.data.builtin_examples = 64
    c.optim.update(lr=1e-5, warmup_steps=1)
    c.checkpoint.update(every=2, use_async=False)
    out = lm.train_and_evaluate(c, str(tmp_path / "sft"))
    assert np.isfinite(out["train/loss"]) and np.isfinite(out["eval/loss"])

    run_cfg = json.load(open(tmp_path / "sft" / "config.json"))["model"]
    assert {k: run_cfg[k] for k in ("rotary_pct", "parallel_residual", "mlp", "vocab_size", "d_model")} == dict(
        rotary_pct=0.25, parallel_residual=True, mlp="gelu_exact", vocab_size=V, d_model=D
    )
    assert isinstance(tok_lib.load_tokenizer(str(tmp_path / "sft" / "tokenizer.model")), tok_lib.HFTokenizer)
    model = TransformerLM(config_lib.ModelConfig(**run_cfg))
    like, _ = parallel.sharded_init(train_state.model_init_fn(model, 8, 0), _mesh(), RULES)
    trained = checkpoint.load_params(str(tmp_path / "sft"), like)
    start = ref.gpt_neox.embed_in.weight.detach().numpy()
    assert np.abs(np.asarray(trained["trunk"]["embed"]) - start).max() < 1e-3  # two tiny steps from HF's weights

    # The CLI: export the SFT run back to an HF directory transformers loads; inspect the source directory.
    from rlhf_jax import convert

    convert.main(["export", "--workdir", str(tmp_path / "sft"), "--out", str(tmp_path / "out")])
    again, info = transformers.GPTNeoXForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched tensors
    np.testing.assert_array_equal(again.gpt_neox.embed_in.weight.detach().numpy(), trained["trunk"]["embed"])
    exported = json.load(open(tmp_path / "out" / "config.json"))
    assert exported["eos_token_id"] == 0 and os.path.exists(tmp_path / "out" / "tokenizer.json")
    summary = convert.inspect(str(hf_dir), fsdp=2, tensor=2)
    assert summary["params"] == ref.num_parameters() and summary["model"]["rotary_pct"] == 0.25
    assert summary["params_bytes_per_device"] < 4 * summary["params"] / 2  # sharded, not replicated
