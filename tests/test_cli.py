"""The command line: an error the user can fix (a config key or value, a preset, a missing file, a --workdir
that is a file) prints as one clear line and a non-zero exit, with no traceback, also from a thread at
shutdown; a bug keeps its traceback."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax.xla_flags import with_device_count
from tests.helpers import ROOT

PRETRAIN = "--config=configs/pretrain.py:tiny"
# name: (arguments after --config and --workdir, what the message must say)
USER_ERRORS = {
    "unknown key": (
        [PRETRAIN, "--config.optim.lrr=1"],
        'error: --config.optim.lrr: no such config key. Did you mean "lr"?',
    ),
    "unknown group": ([PRETRAIN, "--config.opt.lr=1"], "error: --config.opt.lr: no such config key"),
    "impossible value": ([PRETRAIN, "--config.batch_size=-1"], "error: config.batch_size: -1 must be positive"),
    "unknown preset": (["--config=configs/rm.py:nope"], "error: configs/rm.py: unknown preset 'nope'"),
    "no config file": (["--config=configs/nope.py:tiny"], "error: --config=configs/nope.py: no such file"),
    "missing data file": (
        [PRETRAIN, "--config.data.path=/nope/corpus.txt"],
        "error: config.data.path: '/nope/corpus.txt' does not exist",
    ),
    "one sample per prompt for GRPO": (
        ["--config=configs/grpo.py:tiny", "--config.rollout.samples_per_prompt=1"],
        "error: config.pg.advantage='grpo' with samples_per_prompt=1",
    ),
}


def _main(*args):
    env = dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get("XLA_FLAGS", ""), 8))
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jax.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_one_clear_message(r, message):
    assert r.returncode == 1, r.stderr[-3000:]
    assert message in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("case", USER_ERRORS)
def test_a_user_error_is_one_message_and_no_traceback(case, tmp_path):
    args, message = USER_ERRORS[case]
    _assert_one_clear_message(_main(*args, f"--workdir={tmp_path / 'run'}"), message)


# name: (stage, the data file's lines, what the message must say: the file's line and the fix)
DATA_ERRORS = {
    "a line that is not JSON": (
        "sft",
        ['{"prompt": "hi", "response": "there"}', '{"prompt": "x"'],
        "d.jsonl:2: invalid JSON (Expecting ',' delimiter at column 1) — each line must be one complete JSON object.",
    ),
    "a record of another format": (
        "rm",
        ['{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "b"}'],
        "d.jsonl:1: missing key(s) ['prompt', 'responses', 'ranking'] for format 'ranked'",
    ),
}


@pytest.mark.parametrize("case", DATA_ERRORS)
def test_a_malformed_data_line_names_its_file_line_and_fix_without_a_traceback(case, tmp_path):
    stage, lines, message = DATA_ERRORS[case]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    data, workdir = f"--config.data.train_path={tmp_path / 'd.jsonl'}", f"--workdir={tmp_path / 'run'}"
    r = _main(f"--config=configs/{stage}.py:tiny", data, workdir)
    _assert_one_clear_message(r, message)


def test_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "notes").write_text("notes")
    _assert_one_clear_message(
        _main(PRETRAIN, f"--workdir={tmp_path / 'notes'}"), "is an existing file, not a directory"
    )


def test_an_hf_config_without_weights_says_the_weights_are_missing(tmp_path):
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}))
    r = _main("--config=configs/sft.py:tiny", f"--config.init_from={hf_dir}", f"--workdir={tmp_path / 'run'}")
    _assert_one_clear_message(r, "the Hugging Face model's weights are missing")
    assert "model.safetensors" in r.stderr and "no finished checkpoint" not in r.stderr


def test_a_bug_keeps_its_traceback():
    code = "from rlhf_jax import cli\ndef main(argv):\n    raise KeyError('a bug')\ncli.run(main)\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'a bug'" in r.stderr
