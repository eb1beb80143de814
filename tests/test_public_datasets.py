"""Public RLHF data formats: HH-RLHF demonstrations, TL;DR posts and summarize-from-feedback
comparisons become the chat renderings a hand-written reference gives; the TL;DR query is
shortened by the paper's rule; every malformed line names file:line."""

import gzip
import os

import pytest

from rlhf_jax.data import chat, comparisons, lm_datasets, prompts, tldr
from tests import test_comparisons
from tests.conftest import SHARED_DATA
from tests.test_comparisons import _write_jsonl

tok = test_comparisons.tok  # the shared tokenizer fixture

HH_DEV = os.path.join(SHARED_DATA, "hh_rlhf_harmless_dev.jsonl.gz")
POST = {
    "subreddit": "relationships",
    "title": "My cat ignores me",
    "post": "She sits by the door.\nShe eats and leaves.\nWhat should I do?",
}


def _real(row, mask):
    return [int(t) for t, m in zip(row, mask) if m]


def _query(post):
    return f"SUBREDDIT: r/{POST['subreddit']}\n\nTITLE: {POST['title']}\n\nPOST: {post}\n\nTL;DR:"


def test_hh_demonstration_is_the_chosen_dialogue_learning_every_assistant_turn(tok, tmp_path):
    chosen = "\n\nHuman: add 2 3\n\nAssistant: 5\n\nHuman: and 4?\n\nAssistant: 9"
    path = _write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": chosen[:-1] + "8"}])
    source, stats = lm_datasets.build_sft_dataset(
        path, tok.path, 64, str(tmp_path / "d"), fmt="hh_rlhf", template=chat.HH
    )
    rec = source[0]
    ids = _real(rec["tokens"], rec["input_mask"])
    e = tok.encode
    assert ids == [
        tok.bos_id,
        *e("\n\nHuman:"),
        *e(" add 2 3"),
        *e("\n\nAssistant:"),
        *e(" 5"),
        tok.eos_id,
        *e("\n\nHuman:"),
        *e(" and 4?"),
        *e("\n\nAssistant:"),
        *e(" 9"),
        tok.eos_id,
    ]
    assert tok.decode(ids) == chosen
    assert _real(rec["tokens"], rec["loss_mask"]) == [*e(" 5"), tok.eos_id, *e(" 9"), tok.eos_id]
    assert stats["examples"] == 1 and stats["skipped"] == 0


def test_tldr_sft_is_query_then_summary_with_eos(tok, tmp_path):
    path = _write_jsonl(tmp_path / "tldr.jsonl", [{**POST, "summary": "cat is aloof", "id": "x"}])
    source, _ = lm_datasets.build_sft_dataset(path, tok.path, 256, str(tmp_path / "d"), fmt="tldr", template="plain")
    rec = source[0]
    assert _real(rec["tokens"], rec["input_mask"]) == [
        tok.bos_id,
        *tok.encode(_query(POST["post"])),
        *tok.encode(" cat is aloof"),
        tok.eos_id,
    ]
    assert _real(rec["tokens"], rec["loss_mask"]) == [*tok.encode(" cat is aloof"), tok.eos_id]


def _fits(post, budget, tok, extra=()):
    return 1 + len(tok.encode(_query(post))) + len(extra) <= budget


@pytest.mark.parametrize("post", [POST["post"], "word " * 30])
def test_tldr_query_cuts_the_post_at_its_last_newline_until_it_fits(tok, tmp_path, post):
    # Reference: summarize-from-feedback's rule — drop from the last "\n" on while too long, then
    # characters from the end (the longest prefix that fits).
    budget = 1 + len(tok.encode(_query(post))) - 6
    want = post
    while not _fits(want, budget, tok) and "\n" in want:
        want = want[: want.rindex("\n")]
    while not _fits(want, budget, tok):
        want = want[:-1]
    path = _write_jsonl(tmp_path / "p.jsonl", [{**POST, "post": post}])
    source, stats = prompts.build_prompt_dataset(path, "tldr", tok.path, budget, str(tmp_path / "d"), template="plain")
    rec = source[0]
    ids = _real(rec["prompt_tokens"], rec["prompt_mask"])
    assert ids == [tok.bos_id, *tok.encode(_query(want))] and stats["truncated"] == 1
    assert tok.decode(ids).startswith("SUBREDDIT: r/relationships") and tok.decode(ids).endswith("TL;DR:")


def test_tldr_sft_shortens_the_post_not_the_subreddit_or_summary(tok, tmp_path):
    summary = tok.encode(" cat is aloof") + [tok.eos_id]
    budget = 1 + len(tok.encode(_query(POST["post"]))) + len(summary) - 4  # L + 1 tokens
    want = POST["post"]
    while not _fits(want, budget, tok, summary):
        want = want[: want.rindex("\n")]
    assert want != POST["post"] and "\n" in want  # one cut at a newline is enough here
    path = _write_jsonl(tmp_path / "t.jsonl", [{**POST, "summary": "cat is aloof"}])
    source, stats = lm_datasets.build_sft_dataset(
        path, tok.path, budget - 1, str(tmp_path / "d"), fmt="tldr", template="plain"
    )
    rec = source[0]
    assert _real(rec["tokens"], rec["input_mask"]) == [tok.bos_id, *tok.encode(_query(want)), *summary]
    assert _real(rec["tokens"], rec["loss_mask"]) == summary and stats["truncated_prompt"] == 1


def test_tldr_comparison_puts_the_chosen_summary_first(tok, tmp_path):
    line = {
        "info": {**POST, "id": "t3_x"},
        "summaries": [{"text": " she is bored", "policy": "a"}, {"text": " cat hates me", "policy": "b"}],
        "choice": 1,
        "worker": "w",
    }
    cnndm = {"info": {"article": "news", "id": "c"}, "summaries": line["summaries"], "choice": 0}
    path = _write_jsonl(tmp_path / "c.jsonl", [line, cnndm, {**line, "choice": 0}])
    source, stats = comparisons.build_comparison_dataset(
        path, "tldr", tok.path, 256, str(tmp_path / "d"), template=chat.PLAIN
    )
    prompt = [tok.bos_id, *tok.encode(_query(POST["post"]))]
    for rec, first, second in [
        (source[0], " cat hates me", " she is bored"),
        (source[1], " she is bored", " cat hates me"),
    ]:
        assert _real(rec["tokens"][0], rec["input_mask"][0]) == prompt + tok.encode(first) + [tok.eos_id]
        assert _real(rec["tokens"][1], rec["input_mask"][1]) == prompt + tok.encode(second) + [tok.eos_id]
    assert stats["examples"] == 2 and stats["skipped"] == 1  # the CNN/DM record
    with pytest.raises(ValueError, match="c.jsonl:2: a CNN/DM article"):
        comparisons.read_comparisons(path, "tldr", skip_invalid=False)


def test_tldr_prompts_from_posts_and_from_comparisons_agree(tok, tmp_path):
    comp = {"info": POST, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}
    path = _write_jsonl(tmp_path / "p.jsonl", [{**POST, "summary": "x"}, comp])
    source, _ = prompts.build_prompt_dataset(path, "tldr", tok.path, 256, str(tmp_path / "d"), template="plain")
    assert (source[0]["prompt_tokens"] == source[1]["prompt_tokens"]).all()


BAD_LINES = [  # (kind, fmt, bad line, expected message)
    ("sft", "hh_rlhf", '{"chosen": 3}', "needs a string 'chosen' dialogue"),
    ("sft", "hh_rlhf", '{"chosen": "Human: hi Assistant: yo"}', "has no '\\\\n\\\\nAssistant:' turn"),
    ("sft", "hh_rlhf", '{"chosen": "hi\\n\\nAssistant: yo"}', "does not start with"),
    ("sft", "tldr", '{"subreddit": "a", "title": "t", "post": "p"}', "needs 'summary'"),
    ("sft", "tldr", '{"title": "t", "post": "p", "summary": "s"}', r"lacks \['subreddit'\]"),
    ("sft", "tldr", '{"subreddit": "a", "title": null, "post": "p", "summary": "s"}', "title must be a string"),
    ("sft", "tldr", '["a"]', "must be a JSON object"),
    ("sft", "tldr", '{"subreddit": "a", "title": "t", "post": "p", "summary": 3}', "'summary' must be a string"),
    (
        "rm",
        "tldr",
        '{"info": {"subreddit": "a", "title": "t", "post": "p"}, "summaries": [{"text": " x"}]}',
        r"missing key\(s\) \['choice'\]",
    ),
    (
        "rm",
        "tldr",
        '{"info": {"subreddit": "a", "title": "t", "post": "p"}, "summaries": [{"text": " x"}], "choice": 0}',
        "must be a list of two",
    ),
    (
        "rm",
        "tldr",
        '{"info": {"subreddit": "a", "title": "t", "post": "p"}, "summaries": [{"text": " x"}, '
        '{"text": " y"}], "choice": 2}',
        "must be 0 or 1",
    ),
    (
        "rm",
        "tldr",
        '{"info": "p", "summaries": [{"text": " x"}, {"text": " y"}], "choice": 0}',
        "'info' must be a JSON object",
    ),
    ("prompt", "tldr", '{"info": {"subreddit": "a", "post": "p"}}', r"lacks \['title'\]"),
    ("prompt", "tldr", '{"subreddit": "a", "title": "t", "post": "p"', "invalid JSON"),
]
GOOD = {
    "hh_rlhf": {"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
    "tldr": {**POST, "summary": "s"},
}


@pytest.mark.parametrize("kind,fmt,bad,what", BAD_LINES)
def test_malformed_line_names_file_and_line(tok, tmp_path, kind, fmt, bad, what):
    good = GOOD[fmt] if kind != "rm" else {"info": POST, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, "", bad])  # blank line 2 is skipped, bad is line 3
    build = {
        "sft": lambda: lm_datasets.build_sft_dataset(path, tok.path, 32, str(tmp_path / "d"), fmt=fmt),
        "rm": lambda: comparisons.build_comparison_dataset(path, fmt, tok.path, 32, str(tmp_path / "d")),
        "prompt": lambda: prompts.build_prompt_dataset(path, fmt, tok.path, 32, str(tmp_path / "d")),
    }[kind]
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{what}"):
        build()


def test_lengths_too_short_for_the_template_are_named(tok, tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [GOOD["hh_rlhf"]])
    with pytest.raises(ValueError, match="max_prompt_len=3 cannot hold the 'hh' template's bos and assistant prefix"):
        prompts.build_prompt_dataset(path, "hh_rlhf", tok.path, 3, str(tmp_path / "d"), template=chat.HH)
    with pytest.raises(ValueError, match="max_len=4 cannot hold the 'hh' template's"):
        comparisons.build_comparison_dataset(path, "hh_rlhf", tok.path, 4, str(tmp_path / "d"), template=chat.HH)


def test_unknown_sft_format_is_named(tok, tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD["tldr"]])
    with pytest.raises(ValueError, match="format 'reddit' is not one of .*config.data.format"):
        lm_datasets.build_sft_dataset(path, tok.path, 32, str(tmp_path / "d"), fmt="reddit")


def test_tldr_query_reference_strings():
    assert tldr.query(POST) == _query(POST["post"])
    messages, fit = tldr.prompt(POST)
    assert fit(messages, lambda m: True) == messages


@pytest.mark.skipif(not os.path.exists(HH_DEV), reason=f"reference data {HH_DEV} is absent")
def test_a_broken_line_in_the_real_hh_file_names_file_and_line(tok, tmp_path):
    with gzip.open(HH_DEV, "rt") as f:
        lines = [next(f) for _ in range(10)]
    lines[6] = lines[6][:80] + "\n"  # line 7 cut mid-string, as a truncated download would leave it
    path = str(tmp_path / "hh.jsonl.gz")
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    with pytest.raises(ValueError, match=r"hh.jsonl.gz:7: invalid JSON .* each line must be one complete JSON object"):
        lm_datasets.build_sft_dataset(path, tok.path, 64, str(tmp_path / "d"), fmt="hh_rlhf", template=chat.HH)
    with pytest.raises(ValueError, match=r"hh.jsonl.gz:7: invalid JSON"):
        comparisons.build_comparison_dataset(path, "hh_rlhf", tok.path, 64, str(tmp_path / "d"), template=chat.HH)
    source, stats = lm_datasets.build_sft_dataset(
        path, tok.path, 64, str(tmp_path / "d"), fmt="hh_rlhf", template=chat.HH, line_range=(0, 6)
    )
    assert stats["examples"] + stats["skipped"] == 6
