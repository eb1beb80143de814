"""LoRA (Hu et al. 2021): the adapted layer is x @ W + (alpha / r) · x @ A @ B; at init it is the base model
exactly; only the adapters train and hold optimizer state; the reference (adapters off) stays the base model
exactly through training; merging (as the HF export does) gives the adapted model's logits; bad settings fail
naming the key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.sft as sft_cfg
from rlhf_jax import config as config_lib, forward, lora, optim, train_state
from rlhf_jax.models.gpt import TransformerLM, positions_from_mask
from rlhf_jax.models.layers import Dense, LoraConfig, ModelConfig
from tests.helpers import override, tiny

ALL = ("query", "key", "value", "out", "up", "down")
BASE = ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_len=16, dtype="float32")
ADAPTED = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8.0, targets=ALL))


def init(cfg, seed=0, T=6):
    t = jnp.ones((1, T), jnp.int32)
    boxed = TransformerLM(cfg).init(
        jax.random.PRNGKey(seed), t, positions_from_mask(t), t, heads=("lm", "value", "reward")
    )["params"]
    return boxed, jax.tree.map(lambda x: x.value, boxed, is_leaf=lambda x: hasattr(x, "names"))


def randomise_adapters(params, seed=1):
    """Nonzero lora_b (init has B = 0), so the adapters change the output."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    out = [
        0.3 * jax.random.normal(k, x.shape) if str(path[-1].key).endswith("lora_b") else x
        for k, (path, x) in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def lm_batch(seed=0, B=3, T=7):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, 40, (B, T)), jnp.int32)
    mask = jnp.ones((B, T), jnp.int32).at[1, :2].set(0)
    return {"tokens": tokens, "input_mask": mask, "loss_mask": mask}


def logits(cfg, params, batch):
    return forward.apply(params, TransformerLM(cfg), batch["tokens"], batch["input_mask"])["logits"]


def leaves_by_path(tree):
    return {"/".join(str(k.key) for k in p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adapted_dense_equals_hand_reference():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    layer = Dense(
        (5,), ("embed", "mlp"), True, jnp.float32, lora=LoraConfig(rank=2, alpha=3.0, targets=("up",)), name="up"
    )
    p = jax.tree.map(
        lambda v: v.value, layer.init(jax.random.PRNGKey(1), x)["params"], is_leaf=lambda v: hasattr(v, "names")
    )
    assert set(p) == {"kernel", "bias", "lora_a", "lora_b"}
    assert p["lora_a"].shape == (8, 2) and p["lora_b"].shape == (2, 5) and not np.any(p["lora_b"])
    p["lora_b"] = jax.random.normal(jax.random.PRNGKey(2), (2, 5))
    W, b, A, B = (np.asarray(p[k], np.float64) for k in ("kernel", "bias", "lora_a", "lora_b"))
    xn = np.asarray(x, np.float64)
    want = xn @ W + b + (3.0 / 2) * (xn @ A) @ B
    np.testing.assert_allclose(layer.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_at_init_the_adapted_model_is_the_base_model_exactly(dtype):
    base_cfg, cfg = (dataclasses.replace(c, dtype=dtype) for c in (BASE, ADAPTED))
    _, params = init(cfg)
    _, base = init(base_cfg)
    assert leaves_by_path(lora.without_adapters(params)).keys() == leaves_by_path(base).keys()
    # adding adapters leaves the base weights' initialisation (per param name) unchanged
    for k, v in leaves_by_path(base).items():
        np.testing.assert_array_equal(leaves_by_path(params)[k], v, err_msg=k)
    batch = lm_batch()
    np.testing.assert_array_equal(logits(cfg, params, batch), logits(base_cfg, base, batch))


def test_merging_the_adapters_gives_the_adapted_model():
    _, params = init(ADAPTED)
    params = randomise_adapters(params)
    batch = lm_batch()
    adapted = logits(ADAPTED, params, batch)
    assert np.abs(adapted - logits(BASE, lora.without_adapters(params), batch)).max() > 1e-2  # B matters
    np.testing.assert_allclose(logits(BASE, lora.merged(params, ADAPTED), batch), adapted, atol=1e-5)


def adam(weight_decay=0.1):
    c = config_lib.base_config().optim
    c.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=weight_decay)
    return optim.make_optimizer(c, 10)[0]


def nll(params, cfg, batch):
    total, n = forward.summed_token_nll(params, TransformerLM(cfg), batch)
    return total / n


def test_only_adapters_get_gradients_and_optimizer_state():
    boxed, params = init(ADAPTED)
    params = randomise_adapters(params)  # with B = 0, A's gradient would be 0 too
    grads = leaves_by_path(jax.grad(nll)(params, ADAPTED, lm_batch()))
    adapters = [k for k in grads if lora.is_adapter(k.split("/")[-1])]
    assert len(adapters) == 2 * len(ALL) * BASE.n_layers
    for k, g in grads.items():
        if k in adapters:
            assert np.abs(g).max() > 0, k
        else:
            assert not np.any(g), k  # frozen: the trunk, the embeddings, the norms, the biases

    def state_bytes(tx):
        state = tx.init(boxed)
        return sum(x.nbytes for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))

    trainable = sum(x.nbytes for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if lora.is_trainable(p))
    heads = sum(x.nbytes for x in jax.tree.leaves({k: params[k] for k in lora.TRAINED_HEADS}))
    adapter_bytes = sum(grads[k].nbytes for k in adapters)
    assert trainable == adapter_bytes + heads
    full = sum(x.nbytes for x in jax.tree.leaves(params))
    assert state_bytes(adam()) == 2 * full  # Adam's m and v for every leaf
    assert state_bytes(lora.optimizer(adam(), ADAPTED)) == 2 * trainable  # ... for the trainable leaves alone


def test_the_reference_stays_the_base_model_through_training():
    boxed, params = init(ADAPTED)
    start = params
    tx = lora.optimizer(adam(), ADAPTED)
    opt_state = tx.init(params)
    batch = lm_batch()
    nonfinite = jnp.array([0, -1], jnp.int32)

    @jax.jit
    def step(params, opt_state, nonfinite, batch):
        loss, grads = jax.value_and_grad(nll)(params, ADAPTED, batch)
        return train_state.apply_if_finite(tx, grads, loss, params, opt_state, nonfinite, 0)

    for i in range(5):
        params, opt_state, nonfinite = step(params, opt_state, nonfinite, lm_batch(seed=i))
    assert nll(params, ADAPTED, batch) < nll(start, ADAPTED, batch)  # the adapters learnt
    now, before = leaves_by_path(params), leaves_by_path(start)
    for k in now:
        if not lora.is_adapter(k.split("/")[-1]) and k.split("/")[0] not in lora.TRAINED_HEADS:
            np.testing.assert_array_equal(now[k], before[k], err_msg=k)  # frozen, weight decay included
    ref = logits(ADAPTED, lora.adapters_off(params), batch)
    np.testing.assert_array_equal(ref, logits(BASE, lora.without_adapters(start), batch))
    assert np.abs(logits(ADAPTED, params, batch) - ref).max() > 1e-3
    # what the stages call with ref_params=None
    np.testing.assert_array_equal(logits(ADAPTED, lora.reference(params, None), batch), ref)


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_checkpoint_as_if_uninterrupted(tmp_path, capsys):
    """The masked optimizer's state (empty for frozen leaves) saves and restores; the resumed run's steps equal
    an uninterrupted run's."""
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.stages import lm
    from tests.helpers import by_step, resumed_from, stopped_copy

    lora_keys = {
        "model.lora.rank": 4,
        "model.lora.targets": ("query", "value", "up"),
        "optim.total_steps": 6,
        "checkpoint.every": 3,
        "eval_every": 1000,
        "log_every": 1,
    }
    full = tiny(sft_cfg, num_steps=6, **lora_keys)
    lm.train_and_evaluate(full, str(tmp_path / "full"))
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", 3)
    lm.train_and_evaluate(full, str(resumed))  # the same command again: resumes at step 3
    assert resumed_from(capsys.readouterr().out) == 3
    a, b = by_step(read_metrics(str(tmp_path / "full"))), by_step(read_metrics(str(resumed)))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 6):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-6), step


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"model.lora.rank": -1}, r"config.model.lora.rank: -1 is negative"),
        (
            {"model.lora.rank": 4, "model.lora.targets": ("query", "qkv")},
            r"config.model.lora.targets: \['qkv'\] is not a projection LoRA can adapt. Use a non-empty subset of",
        ),
        ({"model.lora.rank": 4, "model.lora.targets": ()}, r"config.model.lora.targets: none"),
        ({"model.lora.rank": 4, "model.lora.targets": ("gate",)}, r"'gate' exists only with model.mlp='swiglu'"),
        ({"model.lora.rank": 4, "model.lora.alpha": 0.0}, r"config.model.lora.alpha: 0.0 must be positive"),
        ({"model.lora.rank": 4, "model.lora.targets": ("lm_head",)}, r"'lm_head' exists only with untied embeddings"),
    ],
)
def test_bad_lora_settings_fail_naming_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny(sft_cfg, **kw))


def test_lora_keys_are_in_every_stages_model_config():
    import configs.dpo
    import configs.ppo
    import configs.pretrain
    import configs.rm

    for module in (configs.pretrain, sft_cfg, configs.rm, configs.ppo, configs.dpo):
        c = module.get_config("tiny")
        assert c.model.lora.to_dict() == {"rank": 0, "alpha": 8.0, "targets": ("query", "value")}
        config_lib.validate(override(c, **{"model.lora.rank": 4}))
        assert config_lib.model_config(c).lora == LoraConfig(rank=4)
    c.lock()  # as rlhf_jax.main locks it: an unknown key fails
    with pytest.raises(KeyError, match='Did you mean "rank"'):
        override(c, **{"model.lora.rnak": 4})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_merges_the_adapters_into_the_hf_checkpoint(family, tmp_path):
    torch = pytest.importorskip("torch", reason="parity tests need torch: pip install torch==2.13.0 (CPU build)")
    transformers = pytest.importorskip("transformers", reason="pip install -r requirements-parity.txt")
    from rlhf_jax import hf

    arch = {
        "gpt2": {},
        "llama": dict(
            position="rope", norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False, n_kv_heads=1
        ),
    }[family]
    targets = ALL + (("gate", "lm_head") if family == "llama" else ())
    cfg = dataclasses.replace(ADAPTED, **arch, lora=LoraConfig(rank=4, alpha=8.0, targets=targets))
    _, params = init(cfg)
    params = randomise_adapters(params)
    batch = lm_batch()
    ours = logits(cfg, params, batch)
    assert (
        np.abs(ours - logits(dataclasses.replace(cfg, lora=LoraConfig()), lora.without_adapters(params), batch)).max()
        > 1e-2
    )  # the adapters change the logits
    out = hf.export(params, cfg, str(tmp_path / family))
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask = (np.asarray(batch[k]) for k in ("tokens", "input_mask"))
    with torch.no_grad():
        theirs = again(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(np.asarray(positions_from_mask(mask)), dtype=torch.long),
        ).logits
    diff = np.abs(theirs.float().numpy() - np.asarray(ours))[mask > 0].max()
    assert diff <= 1e-4, diff


@pytest.mark.slow
def test_ppo_with_lora_raises_a_verifiable_reward(tmp_path):
    """tests/test_pg_stage.py's task with rank-4 adapters on query, value and the (untied) output layer: the
    score rises, the first KL is exactly 0 (the policy starts as its reference), and the checkpoint holds the
    adapters beside the frozen weights."""
    import orbax.checkpoint as ocp

    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.stages import pg
    from tests.helpers import by_step
    from tests.test_pg_stage import config

    c = config(
        **{
            "num_steps": 32,
            "batch_size": 16,
            "optim.lr": 1e-2,
            "kl.init_coef": 0.01,
            "checkpoint.every": 100,
            "model.tie_embeddings": False,
            "model.lora.rank": 4,
            "model.lora.targets": ("query", "value", "lm_head"),
        }
    )
    pg.train_and_evaluate(c, str(tmp_path))
    m = by_step(read_metrics(str(tmp_path)))
    scores = [m[s]["objective/scores"] for s in sorted(m)]
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.15, scores
    assert m[1]["objective/kl"] == 0.0
    with ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("params",)) as mngr:
        saved = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    policy = saved["params"]["policy"]
    assert {"kernel", "lora_a", "lora_b"} <= set(policy["lm_head"])
    assert np.abs(policy["lm_head"]["lora_b"]).max() > 0


@pytest.mark.slow
def test_a_later_stage_starts_from_an_earlier_lora_run_merged_and_dpo_trains_adapters(tmp_path):
    """SFT with LoRA, then DPO with its own adapters from it: DPO's base (its reference) is the SFT model as it
    ran (adapters merged), so at the first step the policy is its reference (every implicit reward exactly 0)."""
    import configs.dpo as dpo_cfg
    from rlhf_jax import checkpoint, parallel
    from rlhf_jax.metrics import read_metrics
    from rlhf_jax.stages import dpo, lm
    from tests.helpers import by_step

    sft = str(tmp_path / "sft")
    lm.train_and_evaluate(
        tiny(
            sft_cfg,
            num_steps=4,
            **{"model.lora.rank": 4, "optim.lr": 1e-2, "model.lora.targets": ("query", "value", "up", "down")},
        ),
        sft,
    )
    sft_model = TransformerLM(
        config_lib.model_config(
            override(
                config_lib.base_config(),
                **{f"model.{k}": v for k, v in checkpoint.read_run_config(sft)["model"].items()},
            )
        )
    )
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    rules = parallel.DEFAULT_RULES
    sft_params = checkpoint.load_params(
        sft, parallel.abstract_params(train_state.model_init_fn(sft_model, 8, 0), mesh, rules)
    )
    assert np.abs(sft_params["trunk"]["block_0"]["mlp"]["up"]["lora_b"]).max() > 0  # SFT trained its adapters

    later = TransformerLM(dataclasses.replace(sft_model.cfg, lora=LoraConfig(rank=2, targets=("key",))))
    fresh, _ = parallel.sharded_init(train_state.model_init_fn(later, 8, 1), mesh, rules)
    loaded = checkpoint.load_base_params(sft, fresh)
    assert set(loaded["trunk"]["block_0"]["attn"]["key"]) == {"kernel", "bias", "lora_a", "lora_b"}
    assert "lora_a" not in loaded["trunk"]["block_0"]["attn"]["query"]
    np.testing.assert_array_equal(
        loaded["trunk"]["block_0"]["attn"]["key"]["lora_a"], fresh["trunk"]["block_0"]["attn"]["key"]["lora_a"]
    )
    batch = lm_batch()
    f32 = lambda cfg: dataclasses.replace(cfg, dtype="float32")  # the runs compute in bf16: compare without rounding
    np.testing.assert_allclose(
        logits(f32(later.cfg), loaded, batch), logits(f32(sft_model.cfg), sft_params, batch), atol=1e-5
    )

    c = tiny(dpo_cfg, num_steps=4, eval_every=4, log_every=1, init_from=sft, **{"model.lora.rank": 2})
    dpo.train_and_evaluate(c, str(tmp_path / "dpo"))
    m = by_step(read_metrics(str(tmp_path / "dpo")))
    assert m[1]["rewards/chosen"] == 0.0 and m[1]["rewards/rejected"] == 0.0
    assert m[4]["rewards/margins"] != 0.0 and np.isfinite(m[4]["eval/loss"])
