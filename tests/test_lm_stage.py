"""Pretrain / SFT stages end to end: loss reference, resume, init_from, clear errors (the command line's:
tests/test_cli.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import forward, train_state
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.gpt import HEADS, TransformerLM, positions_from_mask
from rlhf_jax.models.layers import ModelConfig
from rlhf_jax.stages import lm
from tests.helpers import by_step, pretrain_cfg, resumed_from, sft_cfg, stopped_copy, tiny


def test_sft_loss_counts_only_response_tokens_against_a_hand_reference():
    cfg = ModelConfig(vocab_size=30, d_model=16, n_layers=1, n_heads=2, max_len=16, dtype="float32")
    model = TransformerLM(cfg)
    t = jnp.ones((1, 4), jnp.int32)
    params = jax.tree.map(
        lambda x: x.value,
        model.init(jax.random.PRNGKey(0), t, positions_from_mask(t), t, heads=HEADS)["params"],
        is_leaf=lambda x: hasattr(x, "value"),
    )
    # two sequences (L+1 = 7): prompt tokens carry loss_mask 0, response tokens 1, right padding 0
    tokens = np.array([[2, 5, 6, 7, 8, 9, 0], [2, 11, 12, 13, 14, 0, 0]], np.int32)
    input_mask = (tokens != 0).astype(np.int32)
    loss_mask = np.array([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]], np.int32)
    batch = {"tokens": jnp.asarray(tokens), "input_mask": jnp.asarray(input_mask), "loss_mask": jnp.asarray(loss_mask)}
    nll, mask = forward.token_nll(params, model, batch)
    got = float(jnp.sum(nll * mask) / jnp.sum(mask))

    logits = np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(tokens[:, :-1]),
            positions_from_mask(jnp.asarray(input_mask[:, :-1])),
            jnp.asarray(input_mask[:, :-1]),
        )["logits"],
        np.float64,
    )
    total, n = 0.0, 0
    for b in range(2):
        for t in range(1, 7):  # target token t is predicted at position t-1
            if loss_mask[b, t] and input_mask[b, t]:
                row = logits[b, t - 1]
                total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[b, t]]
                n += 1
    assert n == 6
    np.testing.assert_allclose(got, total / n, rtol=1e-5)
    assert np.all(np.asarray(mask)[0, :2] == 0)  # prompt targets are masked out


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    full = tiny(pretrain_cfg, num_steps=10, **{"optim.total_steps": 10, "checkpoint.every": 5})
    lm.train_and_evaluate(full, str(tmp_path / "full"))
    resumed = stopped_copy(tmp_path / "full", tmp_path / "resumed", 5)
    # The resume restores into the state's abstract shapes: it never initialises a train state to overwrite.
    monkeypatch.setattr(train_state, "create", lambda *a, **k: pytest.fail("a resume initialised a train state"))
    lm.train_and_evaluate(full, str(resumed))  # the same command again: resumes at step 5
    assert resumed_from(capsys.readouterr().out) == 5
    a, b = by_step(read_metrics(str(tmp_path / "full"))), by_step(read_metrics(str(resumed)))
    assert sorted(a) == sorted(b)
    for step in (5, 10):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
    assert a[10]["eval/loss"] == pytest.approx(b[10]["eval/loss"], rel=1e-6)


@pytest.mark.slow
def test_pretrain_then_sft_from_its_workdir(tmp_path):
    pre = lm.train_and_evaluate(tiny(pretrain_cfg), str(tmp_path / "pt"))
    assert np.isfinite(pre["eval/loss"])
    first = read_metrics(str(tmp_path / "pt"))[0]["train/loss"]
    assert pre["train/loss"] < first  # it learns
    sft = tiny(sft_cfg, init_from=str(tmp_path / "pt"))
    out = lm.train_and_evaluate(sft, str(tmp_path / "sft"))
    assert np.isfinite(out["eval/loss"])
    with open(tmp_path / "sft" / "config.json") as f:
        saved = json.load(f)
    assert saved["model"]["d_model"] == 32 and saved["init_from"].endswith("pt")
    assert os.path.exists(tmp_path / "sft" / "tokenizer.model")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "hi", "response": "there"}\n{"prompt": "oops"\n')
    c = tiny(sft_cfg, **{"data.train_path": str(bad), "data.eval_path": ""})
    with pytest.raises(ValueError, match=r"sft\.jsonl:2"):
        lm.train_and_evaluate(c, str(tmp_path / "run"))


def test_batch_not_divisible_by_data_shards_is_rejected(tmp_path):
    c = tiny(pretrain_cfg, batch_size=12)  # mesh.data=8
    with pytest.raises(ValueError, match="config.batch_size=12 is not divisible by the 8"):
        lm.train_and_evaluate(c, str(tmp_path))


def test_a_workdir_that_is_a_file_is_named_before_anything_runs(tmp_path):
    not_a_dir = tmp_path / "runs_file"
    not_a_dir.write_text("notes")
    with pytest.raises(NotADirectoryError, match="is an existing file, not a directory"):
        lm.train_and_evaluate(tiny(pretrain_cfg), str(not_a_dir))
    assert not_a_dir.read_text() == "notes"  # nothing lost
