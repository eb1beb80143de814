"""Chat templates: tags is the fixed role-id layout; hh renders HH-RLHF text exactly; loss falls
only on assistant bodies; a tokenizer without role ids gets a clear error for tags."""

import gzip
import json
import os

import pytest

from rlhf_jax.data import chat, comparisons, hh_rlhf, tokenizer as tok_lib
from rlhf_jax.tasks import builtin_text
from tests.conftest import SHARED_DATA

HH_DEV = os.path.join(SHARED_DATA, "hh_rlhf_harmless_dev.jsonl.gz")
DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "add 2 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4?"},
    {"role": "assistant", "content": "9"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    corpus = builtin_text.write_builtin_corpus(str(d / "corpus.txt"), num_chars=12_000)
    return tok_lib.train_tokenizer(corpus, str(d / "tok.model"), vocab_size=400)


@pytest.fixture(scope="module")
def gpt2_style_tok(tmp_path_factory):
    """A tiny GPT-2-style byte-level BPE tokenizer.json: no role ids, bos = eos = <|endoftext|>."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json support needs the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf_tok")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.train(
        [builtin_text.write_builtin_corpus(str(d / "corpus.txt"), num_chars=12_000)],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf.save(str(d / "tokenizer.json"))
    return tok_lib.load_tokenizer(str(d / "tokenizer.json"))


def test_tags_is_the_fixed_role_id_layout(tok):
    e, r = tok.encode, tok.role_ids
    ids, mask = chat.render_dialogue(DIALOGUE, tok, template=chat.get_template("tags"))
    parts = [
        ([tok.bos_id, r["system"], *e("Be brief."), r["end"], r["user"], *e("add 2 3"), r["end"], r["assistant"]], 0),
        ([*e("5"), r["end"]], 1),
        ([r["user"], *e("and 4?"), r["end"], r["assistant"]], 0),
        ([*e("9"), r["end"]], 1),
    ]
    want = [i for p, _ in parts for i in p]
    assert ids == want
    assert mask == [m for p, m in parts for _ in p]
    assert chat.render_prompt(DIALOGUE[:2], tok) == parts[0][0]
    assert chat.get_template("tags").end_id(tok) == r["end"]


def test_hh_renders_the_hh_rlhf_text_and_learns_assistant_bodies_with_eos(tok):
    hh = chat.get_template("hh")
    ids, mask = chat.render_dialogue(DIALOGUE[1:], tok, template=hh)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "\n\nHuman: add 2 3\n\nAssistant: 5\n\nHuman: and 4?\n\nAssistant: 9"
    assert not set(ids) & set(tok.role_ids.values())
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode(" 5") + [tok.eos_id] + tok.encode(" 9") + [tok.eos_id]
    prompt = chat.render_prompt(DIALOGUE[1:2], tok, template=hh)
    assert tok.decode(prompt) == "\n\nHuman: add 2 3\n\nAssistant:"
    assert prompt == ids[: len(prompt)] and hh.end_id(tok) == tok.eos_id


def test_plain_and_custom_templates(tok):
    pair = chat.prompt_response_to_messages("SUBREDDIT: r/x\n\nTL;DR:", " short")
    ids, mask = chat.render_dialogue(pair, tok, template=chat.get_template("plain"))
    assert ids == [tok.bos_id] + tok.encode("SUBREDDIT: r/x\n\nTL;DR:") + tok.encode(" short") + [tok.eos_id]
    assert sum(mask) == len(tok.encode(" short")) + 1
    custom = chat.get_template("custom", {"user_prefix": "Q: ", "assistant_prefix": "\nA: ", "assistant_suffix": "."})
    ids, mask = chat.render_dialogue(chat.prompt_response_to_messages("hi", "yo"), tok, template=custom)
    assert tok.decode(ids) == "Q: hi\nA: yo."
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("yo") + tok.encode(".") + [tok.eos_id]
    assert chat.template_from_spec(json.loads(json.dumps(custom.spec()))) == custom


def test_a_tokenizer_without_role_ids_needs_a_text_template(gpt2_style_tok):
    tok = gpt2_style_tok
    assert tok.role_ids == {}
    with pytest.raises(ValueError, match="chat_template='tags' needs a tokenizer with role tokens.*chat_template=hh"):
        chat.render_dialogue(DIALOGUE, tok)
    ids, mask = chat.render_dialogue(DIALOGUE[1:], tok, template=chat.HH)
    assert tok.decode(ids) == "\n\nHuman: add 2 3\n\nAssistant: 5\n\nHuman: and 4?\n\nAssistant: 9"
    assert [i for i, m in zip(ids, mask) if m] == tok.encode(" 5") + [tok.eos_id] + tok.encode(" 9") + [tok.eos_id]
    assert chat.HH.end_id(tok) == tok.eos_id


def test_bad_template_settings_are_named():
    with pytest.raises(ValueError, match="chat_template='vicuna' is not a template"):
        chat.get_template("vicuna")
    with pytest.raises(ValueError, match="chat_custom: keys must be among"):
        chat.get_template("custom", {"user_start": "Q: "})


@pytest.mark.skipif(not os.path.exists(HH_DEV), reason=f"reference data {HH_DEV} is absent")
def test_hh_template_round_trips_real_hh_rlhf_dialogues(tok):
    with gzip.open(HH_DEV, "rt") as f:
        dialogues = [json.loads(next(f))["chosen"] for _ in range(50)]
    checked = 0
    for d in dialogues:
        history, response = hh_rlhf.split_hh_dialogue(d)
        try:
            messages = hh_rlhf.hh_messages(history) + [{"role": "assistant", "content": response}]
        except comparisons.DefectiveRecord:
            continue
        if any(not m["content"] for m in messages):  # an empty turn has no space to restore
            continue
        assert tok.decode(chat.render_dialogue(messages, tok, template=chat.HH)[0]) == d
        checked += 1
    assert checked >= 40
