"""Every stage on SmolLM2-135M-Instruct's real weights and tokenizer (configs/smollm2.py: LoRA r8, ChatML): a
few steps of SFT, RM and DPO on real text and of GRPO on its own samples run, stay finite and move their
loss. The model is cut to the first 2 of its 30 blocks (`gguf.convert(..., layers=2)`: the real embedding,
blocks, final norm and tokenizer): the whole model's stage programs compile for about 3 minutes each here,
which the suite cannot afford, and its forward pass and decoding are checked whole against transformers in
tests/test_smollm2.py. The recipes' full-model timings are in README "Real models"."""

import math
import os

import jax
import numpy as np
import pytest

pytest.importorskip("gguf", reason="GGUF import needs llama.cpp's gguf package: bash scripts/setup_env.sh")

from configs import smollm2  # noqa: E402
from rlhf_jax import parallel  # noqa: E402
from rlhf_jax.metrics import read_metrics  # noqa: E402
from rlhf_jax.stages import run_stage  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.helpers import override, smollm2_hf_dir  # noqa: E402

pytestmark = pytest.mark.slow
HH_DEV = os.path.join(SHARED_DATA, "hh_rlhf_harmless_dev.jsonl.gz")


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return smollm2_hf_dir(tmp_path_factory, layers=2)


@pytest.fixture(scope="module", autouse=True)
def one_device():
    """The stages here run on the first of the suite's 8 fake devices. What they check is the real weights and
    tokenizer through each stage; sharding is the tiny stages' tests' subject, and on 8 fake devices of 2 cores
    this file's programs took 95 s instead of 69 s."""
    whole = parallel.make_mesh
    with pytest.MonkeyPatch.context() as m:
        m.setattr(parallel, "make_mesh", lambda requested, devices=None: whole(requested, devices or jax.devices()[:1]))
        yield


def _config(preset, smol_dir, **overrides):
    c = smollm2.get_config(preset)
    c.init_from = smol_dir
    c.checkpoint.every = 1000
    return override(c, **overrides)


def _losses(workdir, key):
    rows = [r for r in read_metrics(workdir) if key in r]
    values = [r[key] for r in rows]
    assert values and all(math.isfinite(v) for v in values), (key, values)
    return values


def test_sft_moves_its_loss_on_the_builtin_demonstrations(smol_dir, tmp_path):
    c = _config(
        "sft",
        smol_dir,
        num_steps=3,
        batch_size=8,
        log_every=1,
        eval_every=1000,
        **{"data.seq_len": 48, "data.builtin_examples": 8, "optim.warmup_steps": 0, "optim.lr": 3e-4},
    )
    run_stage(c, str(tmp_path))
    losses = _losses(str(tmp_path), "train/loss")
    assert losses[-1] < losses[0]  # the same 8 demonstrations every step: the adapters fit them


@pytest.mark.skipif(not os.path.exists(HH_DEV), reason=f"reference data {HH_DEV} is absent")
@pytest.mark.parametrize("preset", ["hh_rm", "hh_dpo"])
def test_rm_and_dpo_train_on_hh_pairs(smol_dir, tmp_path, preset):
    c = _config(
        preset,
        smol_dir,
        num_steps=3,
        batch_size=8,
        log_every=1,
        eval_every=1000,
        **{
            "data.train_path": HH_DEV,
            "data.train_lines": (0, 24),
            "data.eval_lines": (24, 32),
            "data.seq_len": 48,
            "optim.warmup_steps": 0,
            "optim.lr": 3e-4,
        },
    )
    run_stage(c, str(tmp_path))
    losses = _losses(str(tmp_path), "rm/loss" if preset == "hh_rm" else "loss")
    assert len(set(np.round(losses, 6))) > 1, losses  # the loss moves
    if preset == "hh_dpo":
        assert abs(losses[0] - math.log(2)) < 1e-3  # DPO starts at its reference: loss = log 2


def test_grpo_updates_the_adapters_and_stays_finite(smol_dir, tmp_path):
    c = _config(
        "rlvr",
        smol_dir,
        num_steps=2,
        batch_size=8,
        sample_every=1000,
        **{
            "rollout.samples_per_prompt": 2,
            "rollout.max_new_tokens": 8,
            "data.max_prompt_len": 64,
            "reward.function": "rlhf_jax.rewards:fraction_of_vowels",
            "optim.lr": 1e-3,
        },
    )
    run_stage(c, str(tmp_path))
    kl = _losses(str(tmp_path), "objective/kl")
    # The first batch is sampled from the reference itself: its KL is 0 but for the sampler's rounding (with one
    # update per batch π_old's log-probs are the bf16 KV-cache sampler's, not a second full forward pass).
    assert abs(kl[0]) < 0.02
    assert kl[-1] > 0.0  # after one update the LoRA policy has left its reference
    _losses(str(tmp_path), "loss/policy_avg")
