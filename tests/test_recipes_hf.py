"""The public-data recipes started from a tiny random Hugging Face checkpoint, as a real run starts from
GPT-2 or Pythia: the architecture and tokenizer come from the HF directory, not the preset, and every
stage of the recipe runs on it (HH-RLHF: SFT → RM → PPO against that RM with the RM as critic;
TL;DR: SFT → PPO)."""

import json
import os

import pytest

torch = pytest.importorskip("torch", reason="HF checkpoints are built with torch: pip install torch==2.13.0 (CPU)")
transformers = pytest.importorskip("transformers", reason="pip install -r requirements-parity.txt")

import configs.hh_rlhf as hh_recipe  # noqa: E402
import configs.tldr as tldr_recipe  # noqa: E402
from tests.test_recipes import HH_DEV, _finite, _run, _tldr_files  # noqa: E402

D, LAYERS, HEADS, V = 48, 2, 4, 512


def _hf_dir(tmp_path, family: str) -> str:
    """A randomly initialised GPT-2 or GPT-NeoX (Pythia-shaped) model with a byte-level BPE tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rlhf_jax.tasks import builtin_text

    T = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=128))
    else:
        model = T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                vocab_size=V,
                hidden_size=D,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=4 * D,
                max_position_embeddings=128,
                rotary_pct=0.25,
                use_parallel_residual=True,
                tie_word_embeddings=False,
            )
        )
    path = str(tmp_path / family)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = builtin_text.write_builtin_corpus(str(tmp_path / "corpus.txt"), num_chars=20_000)
    tok.train(
        [corpus],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


def _model_of(workdir):
    return json.load(open(os.path.join(workdir, "config.json")))["model"]


@pytest.mark.skipif(not os.path.exists(HH_DEV), reason=f"reference data {HH_DEV} is absent")
@pytest.mark.slow
def test_hh_recipe_runs_sft_rm_ppo_from_a_gpt2_checkpoint(tmp_path):
    hf_dir = _hf_dir(tmp_path, "gpt2")
    data = {"data.train_path": HH_DEV, "data.train_lines": (0, 48)}
    sft = _run(hh_recipe, "tiny_sft", tmp_path / "sft", init_from=hf_dir, num_steps=2, log_every=1, **data)
    assert _finite(sft)
    m = _model_of(tmp_path / "sft")
    assert (m["d_model"], m["n_layers"], m["vocab_size"], m["position"]) == (D, LAYERS, V, "learned")  # from HF

    rm = _run(
        hh_recipe,
        "tiny_rm",
        tmp_path / "rm",
        init_from=str(tmp_path / "sft"),
        num_steps=2,
        log_every=1,
        eval_every=2,
        **data,
        **{"data.eval_lines": (1500, 1516)},
    )
    assert _finite(rm) and 0.0 <= rm["eval/rm/accuracy"] <= 1.0

    ppo = _run(
        hh_recipe,
        "tiny_ppo",
        tmp_path / "ppo",
        init_from=str(tmp_path / "sft"),
        num_steps=1,
        **{
            "data.prompts_path": HH_DEV,
            "reward.kind": "rm",
            "reward.function": "",
            "reward.rm_workdir": str(tmp_path / "rm"),
            "pg.critic": "reward_model",
        },
    )
    assert _finite(ppo) and "objective/scores" in ppo and "objective/kl" in ppo


@pytest.mark.slow
def test_tldr_recipe_runs_sft_ppo_from_a_pythia_shaped_checkpoint(tmp_path):
    hf_dir = _hf_dir(tmp_path, "neox")
    posts, comps = _tldr_files(tmp_path)
    sft = _run(
        tldr_recipe,
        "tiny_sft",
        tmp_path / "sft",
        init_from=hf_dir,
        num_steps=2,
        log_every=1,
        **{"data.train_path": posts},
    )
    assert _finite(sft)
    m = _model_of(tmp_path / "sft")
    assert (m["rotary_pct"], m["parallel_residual"], m["mlp"], m["tie_embeddings"]) == (0.25, True, "gelu_exact", False)
    ppo = _run(
        tldr_recipe,
        "tiny_ppo",
        tmp_path / "ppo",
        init_from=str(tmp_path / "sft"),
        num_steps=1,
        **{"data.prompts_path": comps},
    )
    assert _finite(ppo) and "objective/scores" in ppo
