"""RM comparisons and PPO prompts: records are the chat rendering, best first; truncation follows
the stated rule; HH-RLHF splits into a shared prompt and two responses; line ranges slice files;
bad records name file:line."""

import gzip
import json
import os

import numpy as np
import pytest

from rlhf_jax.data import chat, comparisons, prompts, tokenizer as tok_lib
from rlhf_jax.tasks import builtin_text
from tests.conftest import SHARED_DATA

HH_DEV = os.path.join(SHARED_DATA, "hh_rlhf_harmless_dev.jsonl.gz")
needs_hh = pytest.mark.skipif(not os.path.exists(HH_DEV), reason=f"reference data {HH_DEV} is absent")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = builtin_text.write_builtin_corpus(str(d / "corpus.txt"), num_chars=12_000)
    return tok_lib.train_tokenizer(corpus, str(d / "tok.model"), vocab_size=400)


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def _records(source):
    return [source[i] for i in range(len(source))]


def _row(rec, k):
    """Real tokens of response row k."""
    return rec["tokens"][k][rec["input_mask"][k] > 0].tolist()


def _dialogue(prompt, response, tok):
    return chat.render_dialogue(chat.prompt_response_to_messages(prompt, response), tok)[0]


# --- ranked and pairwise ------------------------------------------------------------------------


def test_ranked_records_are_renderings_best_first_padded_to_k(tok, tmp_path):
    lines = [
        {"prompt": "what did you see", "responses": ["a dull day", "the sun", "a warm kind sun"], "ranking": [2, 0, 1]},
        {"prompt": "describe the day", "responses": ["cold", "calm and warm"], "ranking": [1, 0]},
    ]
    L = 48
    source, stats = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "r.jsonl", lines), "ranked", tok.path, L, str(tmp_path / "d")
    )
    a, b = _records(source)
    assert stats == {
        **stats,
        "examples": 2,
        "num_responses": 3,
        "responses": 5,
        "truncated_prompts": 0,
        "truncated_responses": 0,
        "skipped": 0,
    }
    for rec in (a, b):
        assert set(rec) == {"tokens", "input_mask", "valid", "prompt_len"}
        assert rec["tokens"].shape == rec["input_mask"].shape == (3, L) and rec["valid"].shape == (3,)
        assert np.ndim(rec["prompt_len"]) == 0
        assert all(v.dtype == np.int32 for k, v in rec.items() if k != "prompt_len")
    prompt = chat.render_prompt([{"role": "user", "content": "what did you see"}], tok)
    assert int(a["prompt_len"]) == len(prompt)  # each row's response starts there
    for k, text in enumerate(["a warm kind sun", "a dull day", "the sun"]):  # reordered by the ranking
        assert _row(a, k) == _dialogue("what did you see", text, tok)
        assert _row(a, k)[: len(prompt)] == prompt
    np.testing.assert_array_equal(a["valid"], [1, 1, 1])
    assert [_row(b, 0), _row(b, 1)] == [_dialogue("describe the day", t, tok) for t in ("calm and warm", "cold")]
    np.testing.assert_array_equal(b["valid"], [1, 1, 0])  # K=2 prompt in a K=3 file: an empty third row
    assert not b["input_mask"][2].any() and (b["tokens"][2] == tok.pad_id).all()
    n = int(a["input_mask"][0].sum())  # right padding: real tokens first, then pad
    assert a["input_mask"][0, :n].all() and (a["tokens"][0, n:] == tok.pad_id).all()


def test_num_responses_keeps_the_best(tok, tmp_path):
    lines = [{"prompt": "how was the trip", "responses": ["mud", "gold", "joy", "rot"], "ranking": [1, 2, 0, 3]}]
    source, stats = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "r.jsonl", lines), "ranked", tok.path, 24, str(tmp_path / "d"), num_responses=2
    )
    (rec,) = _records(source)
    assert rec["tokens"].shape[0] == 2 and stats["dropped_responses"] == 2
    assert [_row(rec, 0), _row(rec, 1)] == [_dialogue("how was the trip", t, tok) for t in ("gold", "joy")]


def test_pairwise_equals_ranked_with_chosen_first(tok, tmp_path):
    pair = {"prompt": "tell me about the town", "chosen": "warm and calm", "rejected": "gray mud"}
    ranked = {"prompt": pair["prompt"], "responses": [pair["rejected"], pair["chosen"]], "ranking": [1, 0]}
    p, _ = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "p.jsonl", [pair]), "pairwise", tok.path, 24, str(tmp_path / "d")
    )
    r, _ = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "r.jsonl", [ranked]), "ranked", tok.path, 24, str(tmp_path / "d")
    )
    for key in ("tokens", "input_mask", "valid"):
        np.testing.assert_array_equal(p[0][key], r[0][key])
    assert comparisons.read_comparisons(str(tmp_path / "p.jsonl"), "pairwise")[0]["responses"] == [
        "warm and calm",
        "gray mud",
    ]


def test_message_list_prompt_renders_as_that_dialogue(tok, tmp_path):
    history = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "add 1 2"},
    ]
    line = {"prompt": history, "responses": ["3", "4"], "ranking": [0, 1]}
    source, _ = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "m.jsonl", [line]), "ranked", tok.path, 40, str(tmp_path / "d")
    )
    for k, text in enumerate(["3", "4"]):
        expected, _ = chat.render_dialogue(history + [{"role": "assistant", "content": text}], tok)
        assert _row(source[0], k) == expected


# --- truncation --------------------------------------------------------------------------------


def test_prompt_is_cut_from_the_left_for_all_responses_alike(tok, tmp_path):
    prompt = "copy: " + " ".join(["cat dog bird"] * 10)
    short, long = "ok", "red green red green"
    line = {"prompt": prompt, "responses": [short, long], "ranking": [0, 1]}
    L = 20
    source, stats = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "t.jsonl", [line]), "ranked", tok.path, L, str(tmp_path / "d")
    )
    rec = source[0]
    end = tok.role_ids["end"]
    body_long = tok.encode(long) + [end]
    full_prompt = chat.render_prompt(chat.prompt_response_to_messages(prompt, "")[:1], tok)
    keep = L - len(body_long)  # the longest response decides how much prompt both see
    kept_prompt = [tok.bos_id] + full_prompt[len(full_prompt) - keep + 1 :]
    assert _row(rec, 1) == kept_prompt + body_long and len(_row(rec, 1)) == L
    assert _row(rec, 0) == kept_prompt + tok.encode(short) + [end]  # same context, shorter row
    assert stats["truncated_prompts"] == 1 and stats["truncated_responses"] == 0
    assert stats["max_rendered_tokens"] == len(full_prompt) + len(body_long)


def test_long_response_is_cut_from_the_right_keeping_end(tok, tmp_path):
    long = " ".join(["red green"] * 20)
    line = {"prompt": "hi", "chosen": long, "rejected": "no"}
    L = 16
    source, stats = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "t.jsonl", [line]), "pairwise", tok.path, L, str(tmp_path / "d")
    )
    rec, end = source[0], tok.role_ids["end"]
    # The prompt shrinks to [bos, <|assistant|>]; the response keeps its first L-3 tokens and <|end|>.
    assert _row(rec, 0) == [tok.bos_id, tok.role_ids["assistant"]] + tok.encode(long)[: L - 3] + [end]
    assert _row(rec, 1) == [tok.bos_id, tok.role_ids["assistant"]] + tok.encode("no") + [end]
    assert stats["truncated_prompts"] == 1 and stats["truncated_responses"] == 1


def test_max_prompt_len_caps_the_prompt(tok, tmp_path):
    prompt = "copy: " + " ".join(["cat dog"] * 6)
    line = {"prompt": prompt, "chosen": "cat", "rejected": "dog"}
    source, stats = comparisons.build_comparison_dataset(
        _write_jsonl(tmp_path / "t.jsonl", [line]), "pairwise", tok.path, 64, str(tmp_path / "d"), max_prompt_len=6
    )
    full_prompt = chat.render_prompt([{"role": "user", "content": prompt}], tok)
    assert _row(source[0], 0) == [tok.bos_id] + full_prompt[-5:] + tok.encode("cat") + [tok.role_ids["end"]]
    assert stats["truncated_prompts"] == 1


# --- HH-RLHF -----------------------------------------------------------------------------------

HH_LINE = {
    "chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: add 1 2\n\nAssistant: It is 3.",
    "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: add 1 2\n\nAssistant: no",
}


def test_hh_dialogue_splits_into_messages_and_two_responses(tmp_path):
    (rec,) = comparisons.read_comparisons(_write_jsonl(tmp_path / "hh.jsonl", [HH_LINE]), "hh_rlhf")
    assert rec["prompt_messages"] == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "add 1 2"},
    ]
    assert rec["responses"] == ["It is 3.", "no"]


def _hh_text(messages, response):
    tag = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{tag[m['role']]}: {m['content']}" for m in messages) + f"\n\nAssistant: {response}"


@needs_hh
def test_hh_real_file_shares_the_prompt_and_splits_the_responses():
    recs = comparisons.read_comparisons(HH_DEV, "hh_rlhf", line_range=(0, 200))
    with gzip.open(HH_DEV, "rt") as f:
        raw = {f"{HH_DEV}:{n}": json.loads(line) for n, line in enumerate(f, start=1) if n <= 200}
    assert len(recs) == 199  # line 87 has an empty chosen response and is skipped
    assert f"{HH_DEV}:87" not in {r["where"] for r in recs}
    differ = 0
    for r in recs:
        assert r["prompt_messages"][-1]["role"] == "user" and len(r["responses"]) == 2
        # The shared prompt and each response give back the original dialogues exactly.
        src = raw[r["where"]]
        assert [_hh_text(r["prompt_messages"], x) for x in r["responses"]] == [src["chosen"], src["rejected"]]
        differ += r["responses"][0] != r["responses"][1]
    assert differ >= 195


@needs_hh
def test_hh_train_eval_split_by_line_range(tok, tmp_path):
    train, ts = comparisons.build_comparison_dataset(
        HH_DEV, "hh_rlhf", tok.path, 48, str(tmp_path / "d"), line_range=(0, 1500)
    )
    evals, es = comparisons.build_comparison_dataset(
        HH_DEV, "hh_rlhf", tok.path, 48, str(tmp_path / "d"), line_range=(1500, 1800)
    )
    # 6 known-defective pairs: lines 87, 517, 926, 1104 (empty chosen), 1255 (different histories) and 1689.
    assert (ts["examples"], ts["skipped"], es["examples"], es["skipped"]) == (1495, 5, 299, 1)
    assert len(train) == 1495 and len(evals) == 299 and ts["num_responses"] == 2
    rec = evals[0]
    assert rec["valid"].tolist() == [1, 1] and rec["tokens"].shape == (2, 48)
    for k in range(2):
        row = _row(rec, k)
        assert row[0] == tok.bos_id and row[-1] == tok.role_ids["end"]
    with pytest.raises(ValueError, match=r"hh_rlhf_harmless_dev.jsonl.gz:87: 'chosen' is an empty response"):
        comparisons.read_comparisons(HH_DEV, "hh_rlhf", line_range=(0, 100), skip_invalid=False)
    with pytest.raises(ValueError, match=r"hh_rlhf_harmless_dev.jsonl.gz:1255: 'chosen' and 'rejected' differ"):
        comparisons.read_comparisons(HH_DEV, "hh_rlhf", line_range=(1200, 1300), skip_invalid=False)


def test_hh_defects_are_skipped_by_default_and_errors_on_request(tmp_path):
    mismatch = {"chosen": HH_LINE["chosen"], "rejected": HH_LINE["rejected"].replace("add 1 2", "add 2 2")}
    empty = {"chosen": HH_LINE["chosen"].replace("It is 3.", ""), "rejected": HH_LINE["rejected"]}
    path = _write_jsonl(tmp_path / "hh.jsonl", [HH_LINE, mismatch, empty])
    assert len(comparisons.read_comparisons(path, "hh_rlhf")) == 1
    with pytest.raises(ValueError, match="hh.jsonl:2: 'chosen' and 'rejected' differ"):
        comparisons.read_comparisons(path, "hh_rlhf", skip_invalid=False)
    with pytest.raises(ValueError, match="hh.jsonl:3: 'chosen' is an empty response"):
        comparisons.read_comparisons(path, "hh_rlhf", line_range=(2, 3), skip_invalid=False)


# --- line ranges, caching, bad data ------------------------------------------------------------


def test_line_range_selects_lines_counted_from_zero(tok, tmp_path):
    lines = [{"prompt": f"p{i}", "chosen": "gold", "rejected": "mud"} for i in range(6)]
    lines[3] = ""  # blank lines count as lines
    path = _write_jsonl(tmp_path / "r.jsonl", lines)
    got = comparisons.read_comparisons(path, "pairwise", line_range=(2, 5))
    assert [r["prompt_messages"][0]["content"] for r in got] == ["p2", "p4"]
    assert [r["where"] for r in got] == [f"{path}:3", f"{path}:5"]
    source, stats = comparisons.build_comparison_dataset(
        path, "pairwise", tok.path, 16, str(tmp_path / "d"), line_range=(2, 5)
    )
    assert len(source) == stats["examples"] == 2
    with pytest.raises(ValueError, match="reaches line 9 but the file has 6 lines"):
        comparisons.read_comparisons(path, "pairwise", line_range=(2, 9))
    for bad in [(3, 3), (-1, 2), (1,), ("0", "2")]:
        with pytest.raises(ValueError, match="must be \\(start, stop\\)"):
            comparisons.read_comparisons(path, "pairwise", line_range=bad)


def test_gzip_reads_like_plain_and_rebuild_reuses_cache(tok, tmp_path, monkeypatch):
    lines = [
        {"prompt": "add 1 2", "chosen": "3", "rejected": "4"},
        {"prompt": "hi", "chosen": "hello", "rejected": "no"},
    ]
    plain = _write_jsonl(tmp_path / "x.jsonl", lines)
    gz = str(tmp_path / "x.jsonl.gz")
    with open(plain, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    a, stats = comparisons.build_comparison_dataset(plain, "pairwise", tok.path, 16, str(tmp_path / "d"))
    b, _ = comparisons.build_comparison_dataset(gz, "pairwise", tok.path, 16, str(tmp_path / "d"))
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(_records(a), _records(b)))

    def no_rendering(*args, **kwargs):
        raise AssertionError("re-rendered although the prepared dataset exists")

    monkeypatch.setattr(comparisons, "comparison_example", no_rendering)
    again, again_stats = comparisons.build_comparison_dataset(plain, "pairwise", tok.path, 16, str(tmp_path / "d"))
    assert again_stats == stats and len(again) == 2
    with pytest.raises(AssertionError, match="re-rendered"):  # another length is another dataset
        comparisons.build_comparison_dataset(plain, "pairwise", tok.path, 20, str(tmp_path / "d"))


BAD_LINES = [
    ("ranked", '{"prompt": "hi", "responses": ["a", "b"], ', "invalid JSON"),
    ("ranked", '["hi", ["a", "b"], [0, 1]]', "expected a JSON object"),
    ("ranked", '{"prompt": "hi", "responses": ["a", "b"]}', r"missing key\(s\) \['ranking'\]"),
    ("ranked", '{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 0]}', "not a permutation of 0..1"),
    ("ranked", '{"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 2]}', "not a permutation"),
    ("ranked", '{"prompt": "hi", "responses": ["a", "b"], "ranking": [true, false]}', "not a permutation"),
    ("ranked", '{"prompt": "hi", "responses": ["a"], "ranking": [0]}', "needs K >= 2"),
    ("ranked", '{"prompt": "hi", "responses": ["a", " "], "ranking": [1, 0]}', r"'responses\[1\]' is an empty"),
    ("ranked", '{"prompt": "hi", "responses": ["a", 3], "ranking": [0, 1]}', r"'responses\[1\]' must be a string"),
    ("ranked", '{"prompt": "hi", "responses": "ab", "ranking": [0, 1]}', "must be JSON lists"),
    ("ranked", '{"prompt": 7, "responses": ["a", "b"], "ranking": [0, 1]}', "'prompt' must be a string or"),
    ("pairwise", '{"prompt": "hi", "chosen": "a", "rejected": ""}', "'rejected' is an empty response"),
    ("pairwise", '{"prompt": "hi", "chosen": ["a"], "rejected": "b"}', "'chosen' must be a string"),
    ("pairwise", '{"prompt": "hi", "good": "a", "bad": "b"}', r"missing key\(s\) \['chosen', 'rejected'\]"),
    ("hh_rlhf", '{"chosen": "Human: hi Assistant: a", "rejected": "x"}', "has no '\\\\n\\\\nAssistant:' turn"),
    ("hh_rlhf", '{"chosen": "hi\\n\\nAssistant: a", "rejected": "hi\\n\\nAssistant: b"}', "does not start with"),
]


@pytest.mark.parametrize("fmt,bad,what", BAD_LINES)
def test_malformed_line_names_file_and_line(tok, tmp_path, fmt, bad, what):
    good = json.dumps(
        {
            "ranked": {"prompt": "hi", "responses": ["a", "b"], "ranking": [0, 1]},
            "pairwise": {"prompt": "hi", "chosen": "a", "rejected": "b"},
            "hh_rlhf": HH_LINE,
        }[fmt]
    )
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad])  # blank line 2 is skipped, bad is line 3
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{what}"):
        # ranked and pairwise files are the user's own: every defect is an error by default
        comparisons.build_comparison_dataset(
            path, fmt, tok.path, 16, str(tmp_path / "d"), skip_invalid=False if fmt == "hh_rlhf" else None
        )


def test_bad_arguments_are_named(tok, tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="'pairs' is not one of"):
        comparisons.build_comparison_dataset(path, "pairs", tok.path, 16, str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        comparisons.build_comparison_dataset(str(tmp_path / "nope.jsonl"), "pairwise", tok.path, 16, str(tmp_path))
    with pytest.raises(ValueError, match="max_len=3 must be"):
        comparisons.build_comparison_dataset(path, "pairwise", tok.path, 3, str(tmp_path / "d"))


# --- PPO prompts -------------------------------------------------------------------------------


def test_prompts_are_left_padded_renderings(tok, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 2 3"}]
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": messages}])
    P = 24
    source, stats = prompts.build_prompt_dataset(path, "prompt", tok.path, P, str(tmp_path / "d"))
    assert stats == {**stats, "examples": 2, "truncated": 0}
    for rec, msgs in zip(_records(source), [[{"role": "user", "content": "hi"}], messages]):
        ids = chat.render_prompt(msgs, tok)
        assert rec["prompt_tokens"].dtype == np.int32 and rec["prompt_tokens"].shape == (P,)
        np.testing.assert_array_equal(rec["prompt_tokens"], [tok.pad_id] * (P - len(ids)) + ids)
        np.testing.assert_array_equal(rec["prompt_mask"], [0] * (P - len(ids)) + [1] * len(ids))
        assert rec["prompt_tokens"][-1] == tok.role_ids["assistant"]  # generation continues right here


def test_long_prompt_is_cut_from_the_left_keeping_bos(tok, tmp_path):
    text = "copy: " + " ".join(["cat dog bird"] * 10)
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": text}])
    P = 10
    source, stats = prompts.build_prompt_dataset(path, "prompt", tok.path, P, str(tmp_path / "d"))
    ids = chat.render_prompt([{"role": "user", "content": text}], tok)
    np.testing.assert_array_equal(source[0]["prompt_tokens"], [tok.bos_id] + ids[len(ids) - P + 1 :])
    assert source[0]["prompt_mask"].all() and stats["truncated"] == 1 and stats["max_rendered_tokens"] == len(ids)


def test_hh_prompt_is_the_history_ending_with_the_assistant_tag(tok, tmp_path):
    other = dict(HH_LINE, chosen="\n\nHuman: copy: cat\n\nAssistant: cat")
    path = _write_jsonl(tmp_path / "hh.jsonl", [HH_LINE, other])
    source, stats = prompts.build_prompt_dataset(path, "hh_rlhf", tok.path, 32, str(tmp_path / "d"), line_range=(1, 2))
    assert len(source) == stats["examples"] == 1
    rec = source[0]
    real = rec["prompt_tokens"][rec["prompt_mask"] > 0].tolist()
    assert real == chat.render_prompt([{"role": "user", "content": "copy: cat"}], tok)
    assert real[0] == tok.bos_id and real[-1] == tok.role_ids["assistant"]


@needs_hh
def test_hh_real_prompts(tok, tmp_path):
    source, stats = prompts.build_prompt_dataset(
        HH_DEV, "hh_rlhf", tok.path, 64, str(tmp_path / "d"), line_range=(0, 100)
    )
    assert len(source) == stats["examples"] == 100
    for rec in _records(source):
        real = rec["prompt_tokens"][rec["prompt_mask"] > 0]
        assert real[0] == tok.bos_id and real[-1] == tok.role_ids["assistant"]
        assert np.all(np.diff(rec["prompt_mask"]) >= 0)  # pads only on the left


BAD_PROMPTS = [
    ("prompt", '{"prompt": "hi"', "invalid JSON"),
    ("prompt", '{"question": "hi"}', "expected key 'prompt' or 'messages'"),
    ("prompt", '{"prompt": ["hi"]}', "'prompt' must be a string"),
    ("prompt", '{"prompt": " "}', "'prompt' is empty"),
    (
        "prompt",
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}',
        "last message is an assistant turn",
    ),
    ("prompt", '{"messages": [{"role": "robot", "content": "hi"}]}', "role='robot' is not one of"),
    ("hh_rlhf", '{"rejected": "\\n\\nHuman: hi\\n\\nAssistant: a"}', "needs a string 'chosen'"),
]


@pytest.mark.parametrize("fmt,bad,what", BAD_PROMPTS)
def test_malformed_prompt_names_file_and_line(tok, tmp_path, fmt, bad, what):
    good = json.dumps({"prompt": {"prompt": "hi"}, "hh_rlhf": HH_LINE}[fmt])
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad])
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{what}"):
        prompts.build_prompt_dataset(path, fmt, tok.path, 16, str(tmp_path / "d"))
