"""`python -m rlhf_jax.sample`: prompts from flags or a JSONL, and a chat driven through a pipe, all through the
stages' jitted sampler in the model's own chat format."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax import sample as sample_cli
from rlhf_jax.xla_flags import with_device_count
from tests.helpers import ROOT, smollm2_hf_dir


def sample(*args, stdin=None, env=None):
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.sample", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return smollm2_hf_dir(tmp_path_factory)


@pytest.mark.slow
def test_a_real_chat_model_holds_a_conversation_through_a_pipe(smollm2):
    # f32: the answer must not hang on bf16 rounding, which differs with the device count and XLA's flags
    greedy = [f"--workdir={smollm2}", "--temperature=0", "--max_new_tokens=16", "--max_prompt_len=96"]
    greedy.append("--dtype=float32")
    # a conversation: the second question only makes sense with the first turn in the history
    # on one CPU device, as a user's machine has: 16 s instead of 31 s on the suite's 8 fake ones
    one_device = dict(os.environ, XLA_FLAGS=with_device_count(os.environ["XLA_FLAGS"], 1))
    stdin = "What is the capital of France?\nAnd of Italy?\n/exit\nignored\n"
    chat = sample(*greedy, "--chat", stdin=stdin, env=one_device)
    france, italy = chat.splitlines()
    assert "Paris" in france and "Rome" in italy, chat


class Recorder:
    """A stand-in for Sampler that answers with the number of messages it was given."""

    def __init__(self):
        self.seen = []

    def responses(self, dialogues, seed=0):
        self.seen += [[m["content"] for m in d] for d in dialogues]
        return [f"reply {len(d)}" for d in dialogues]


def test_chat_keeps_the_history_until_reset_and_stops_at_exit():
    rec, written = Recorder(), []
    sample_cli.chat(rec, ["hi\n", "\n", "more\n", "/reset\n", "again\n", "/exit\n", "never\n"], written.append)
    assert rec.seen == [["hi"], ["hi", "reply 1", "more"], ["again"]]
    assert written == ["reply 1\n", "reply 3\n", "(history cleared)\n", "reply 1\n"]


def test_samples_are_written_as_jsonl_with_each_records_fields_or_as_text_under_headers():
    records = [{"prompt": "a", "id": 1}, {"prompt": "b"}]
    texts = ["x", "y\nz", "u", "v"]  # 2 samples a prompt; a response may run over lines
    jsonl = sample_cli.format_samples(records, texts, 2, jsonl=True).splitlines()
    assert [json.loads(line) for line in jsonl] == [
        {"prompt": "a", "id": 1, "response": "x"},
        {"prompt": "a", "id": 1, "response": "y\nz"},
        {"prompt": "b", "response": "u"},
        {"prompt": "b", "response": "v"},
    ]
    text = sample_cli.format_samples(records, texts, 2, jsonl=False)
    parts = [
        "prompt 0, sample 0\nx\n",
        "prompt 0, sample 1\ny\nz\n",
        "prompt 1, sample 0\nu\n",
        "prompt 1, sample 1\nv\n",
    ]
    assert text.split("--- ") == ["", *parts]
    assert sample_cli.format_samples(records[:1], ["x"], 1, jsonl=False) == "x\n"


def test_a_prompts_jsonl_is_answered_in_order_keeping_each_records_fields(tmp_path):
    import argparse

    path, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    path.write_text(
        json.dumps({"prompt": "hi", "id": 7}) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "yo"}]})
    )
    args = argparse.Namespace(chat=False, prompt=[], prompts_path=str(path), out=str(out), n=2, seed=0)
    sample_cli.run(args, sampler=Recorder())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows] == ["reply 1"] * 4  # the stand-in answers with the messages it got
    assert rows[0] == rows[1] == {"prompt": "hi", "id": 7, "response": "reply 1"}
    assert rows[2]["messages"][0]["content"] == "yo"


def test_exactly_one_source_of_prompts_is_asked_for():
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.sample", "--workdir=x", "--prompt=a", "--chat"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "exactly one of --prompt" in r.stderr
