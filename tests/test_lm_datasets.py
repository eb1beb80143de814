"""LM datasets: packed text windows are the token stream, SFT masks are exactly the assistant
tokens, truncation follows the stated rule, bad records name file:line, builds are cached."""

import gzip
import json
import os

import numpy as np
import pytest

from rlhf_jax.data import chat, lm_datasets, records, tokenizer as tok_lib
from rlhf_jax.tasks import builtin_text

L = 16  # seq_len


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return builtin_text.write_builtin_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus.txt"), num_chars=12_000)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return tok_lib.train_tokenizer(corpus, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=400)


def _records(source):
    return [source[i] for i in range(len(source))]


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


# --- packed text -------------------------------------------------------------------------------


def test_packed_windows_are_the_token_stream_and_val_is_the_tail(corpus, tok, tmp_path):
    splits = lm_datasets.build_text_dataset(corpus, tok.path, L, str(tmp_path), val_fraction=0.1)
    stream = np.asarray(tok.encode(open(corpus).read()) + [tok.eos_id])
    n_train = int(len(stream) * 0.9)
    for name, part in [("train", stream[:n_train]), ("validation", stream[n_train:])]:
        recs = _records(splits[name])
        assert len(recs) == len(part) // (L + 1)  # ragged tail dropped
        for r in recs:
            assert set(r) == {"tokens", "input_mask", "loss_mask"}
            for v in r.values():
                assert v.dtype == np.int32 and v.shape == (L + 1,)
            assert r["input_mask"].all() and r["loss_mask"].all()
        np.testing.assert_array_equal(np.concatenate([r["tokens"] for r in recs]), part[: len(recs) * (L + 1)])


def test_each_file_is_a_document_ending_in_eos(tok, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The cat sees the dog.\n" * 20)
    b.write_text("12 plus 3 is 15." * 20)
    splits = lm_datasets.build_text_dataset([str(a), str(b)], tok.path, L, str(tmp_path / "data"), val_fraction=0.0)
    assert splits["validation"] is None
    stream = tok.encode(a.read_text()) + [tok.eos_id] + tok.encode(b.read_text()) + [tok.eos_id]
    got = np.concatenate([r["tokens"] for r in _records(splits["train"])])
    np.testing.assert_array_equal(got, stream[: len(got)])
    assert len(stream) - len(got) < L + 1


def test_blockwise_tokenization_equals_whole_text(corpus, tok, monkeypatch):
    monkeypatch.setattr(lm_datasets, "_CHUNK_CHARS", 200)  # many blocks split at newlines
    text = open(corpus).read()
    np.testing.assert_array_equal(lm_datasets.tokenize_corpus([corpus], tok), tok.encode(text) + [tok.eos_id])


def test_rebuild_reuses_cache_and_a_changed_file_rebuilds(tok, tmp_path, monkeypatch):
    src = tmp_path / "text.txt"
    src.write_text("A small red fox finds the river.\n" * 30)
    first = _records(lm_datasets.build_text_dataset(str(src), tok.path, L, str(tmp_path / "d"))["train"])

    def no_tokenizing(*args):
        raise AssertionError("re-tokenized although the prepared dataset exists")

    monkeypatch.setattr(lm_datasets, "tokenize_corpus", no_tokenizing)
    again = _records(lm_datasets.build_text_dataset(str(src), tok.path, L, str(tmp_path / "d"))["train"])
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, again)) and len(first) == len(again)

    src.write_text("Now a different text about boats.\n" * 30)
    with pytest.raises(AssertionError, match="re-tokenized"):
        lm_datasets.build_text_dataset(str(src), tok.path, L, str(tmp_path / "d"))


def test_corpus_too_small_for_a_window(tok, tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("cat\n")
    with pytest.raises(ValueError, match="fewer than one window"):
        lm_datasets.build_text_dataset(str(src), tok.path, L, str(tmp_path / "d"))


# --- SFT ---------------------------------------------------------------------------------------


def test_sft_records_mask_exactly_the_assistant_tokens(tok, tmp_path):
    dialogue = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "add 2 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "copy: cat"},
        {"role": "assistant", "content": "cat"},
    ]
    path = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": dialogue}, {"prompt": "add 2 3", "response": "5"}])
    seq_len = 40
    source, stats = lm_datasets.build_sft_dataset(path, tok.path, seq_len, str(tmp_path / "d"))
    e, r = tok.encode, tok.role_ids
    # Hand-written rendering: bos, then <|role|> content <|end|> per message.
    parts = [
        ([tok.bos_id], 0),
        ([r["system"]], 0),
        (e("Be brief."), 0),
        ([r["end"]], 0),
        ([r["user"]], 0),
        (e("add 2 3"), 0),
        ([r["end"]], 0),
        ([r["assistant"]], 0),
        (e("5") + [r["end"]], 1),
        ([r["user"]], 0),
        (e("copy: cat"), 0),
        ([r["end"]], 0),
        ([r["assistant"]], 0),
        (e("cat") + [r["end"]], 1),
    ]
    ids = [t for p, _ in parts for t in p]
    mask = [m for p, m in parts for _ in p]
    single = [tok.bos_id, r["user"], *e("add 2 3"), r["end"], r["assistant"], *e("5"), r["end"]]
    expected = [(ids, mask), (single, [0] * (len(single) - len(e("5")) - 1) + [1] * (len(e("5")) + 1))]
    assert len(source) == 2 and stats["examples"] == 2 and stats["truncated"] == 0
    for rec, (ids, mask) in zip(_records(source), expected):
        pad = seq_len + 1 - len(ids)
        np.testing.assert_array_equal(rec["tokens"], ids + [tok.pad_id] * pad)
        np.testing.assert_array_equal(rec["loss_mask"], mask + [0] * pad)
        np.testing.assert_array_equal(rec["input_mask"], [1] * len(ids) + [0] * pad)
    assert stats["target_tokens"] == sum(sum(m) for _, m in expected)


def test_sft_truncates_prompt_from_left_then_response_from_right(tok, tmp_path):
    long_prompt = "copy: " + " ".join(["cat dog bird"] * 10)
    long_response = " ".join(["red green"] * 10)
    lines = [
        {"prompt": long_prompt, "response": "cat"},
        {"prompt": "hi", "response": long_response},
        {"prompt": "hi", "response": "ok"},
    ]
    source, stats = lm_datasets.build_sft_dataset(
        _write_jsonl(tmp_path / "t.jsonl", lines), tok.path, L, str(tmp_path / "d")
    )
    assert stats == {**stats, "examples": 3, "truncated": 2, "truncated_prompt": 2, "truncated_response": 1}
    r, budget = tok.role_ids, L + 1
    recs = _records(source)
    # 1: bos, then the prompt's last tokens (ending with <|assistant|>), then the whole response.
    full, _ = chat.render_dialogue(chat.prompt_response_to_messages(long_prompt, "cat"), tok)
    response = tok.encode("cat") + [r["end"]]
    np.testing.assert_array_equal(recs[0]["tokens"], [tok.bos_id] + full[len(full) - budget + 1 :])
    np.testing.assert_array_equal(recs[0]["loss_mask"], [0] * (budget - len(response)) + [1] * len(response))
    # 2: prompt cut to [bos, <|assistant|>], response keeps its first L-1 tokens (no <|end|>).
    np.testing.assert_array_equal(
        recs[1]["tokens"], [tok.bos_id, r["assistant"]] + tok.encode(long_response)[: budget - 2]
    )
    np.testing.assert_array_equal(recs[1]["loss_mask"], [0, 0] + [1] * (budget - 2))
    assert recs[2]["input_mask"].sum() < budget  # the short one is padded, not cut


def test_sft_gzip_reads_like_plain(tok, tmp_path):
    lines = [{"prompt": "reverse: a b", "response": "b a"}, {"prompt": "add 1 1", "response": "2"}]
    plain = _write_jsonl(tmp_path / "x.jsonl", lines)
    gz = str(tmp_path / "x.jsonl.gz")
    with open(plain, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    a, _ = lm_datasets.build_sft_dataset(plain, tok.path, L, str(tmp_path / "d"))
    b, _ = lm_datasets.build_sft_dataset(gz, tok.path, L, str(tmp_path / "d"), split="eval")
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(_records(a), _records(b)))


def test_sft_rebuild_reuses_cache(tok, tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": "add 1 2", "response": "3"}])
    _, stats = lm_datasets.build_sft_dataset(path, tok.path, L, str(tmp_path / "d"))

    def no_rendering(*args):
        raise AssertionError("re-rendered although the prepared dataset exists")

    monkeypatch.setattr(lm_datasets, "sft_example", no_rendering)
    source, again = lm_datasets.build_sft_dataset(path, tok.path, L, str(tmp_path / "d"))
    assert again == stats and len(source) == 1


BAD_LINES = [
    ('{"prompt": "add 1 2", "response": ', "invalid JSON"),
    ('["prompt", "response"]', "expected a JSON object"),
    ('{"question": "add 1 2", "answer": "3"}', "expected keys"),
    ('{"prompt": 12, "response": "3"}', "'prompt' must be a string"),
    ('{"prompt": "add 1 2", "response": "  "}', "response .* is empty"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role='robot' is not one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with the assistant turn"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "content must be a string"),
]


@pytest.mark.parametrize("bad,what", BAD_LINES)
def test_malformed_line_names_file_and_line(tok, tmp_path, bad, what):
    good = json.dumps({"prompt": "add 1 2", "response": "3"})
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad])  # blank line 2 is skipped, bad is line 3
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{what}"):
        lm_datasets.build_sft_dataset(path, tok.path, L, str(tmp_path / "d"))


def test_missing_files_are_named(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        lm_datasets.build_sft_dataset(str(tmp_path / "nope.jsonl"), tok.path, L, str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        lm_datasets.build_text_dataset(str(tmp_path / "nope.txt"), tok.path, L, str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="no.model"):
        lm_datasets.build_text_dataset(tok.path, str(tmp_path / "no.model"), L, str(tmp_path / "d"))


def test_builtin_sft_responses_are_correct_and_deterministic(tmp_path):
    a = builtin_text.write_builtin_sft(str(tmp_path / "a.jsonl"), num_examples=200, seed=3)
    b = builtin_text.write_builtin_sft(str(tmp_path / "b.jsonl"), num_examples=200, seed=3)
    assert open(a).read() == open(b).read()
    formats = set()
    for where, rec in records.read_jsonl(a):
        messages = chat.record_to_messages(rec, where)
        formats.add("messages" in rec)
        for user, answer in zip(messages, messages[1:]):
            if user["role"] == "user":
                assert answer["content"] == builtin_text.solve_instruction(user["content"])
    assert formats == {True, False}
    assert builtin_text.solve_instruction("reverse: a b c") == "c b a"
    assert builtin_text.solve_instruction("add 3 4") == "7"
    assert builtin_text.solve_instruction("sort: 10 9 2") == "2 9 10"


def test_builtin_corpus_is_exact_size_and_not_rewritten(tmp_path):
    path = builtin_text.write_builtin_corpus(str(tmp_path / "c.txt"), num_chars=5000, seed=1)
    assert os.path.getsize(path) == 5000
    os.utime(path, ns=(1, 1))
    builtin_text.write_builtin_corpus(path, num_chars=5000, seed=1)  # same content: untouched (cache key)
    assert os.stat(path).st_mtime_ns == 1
