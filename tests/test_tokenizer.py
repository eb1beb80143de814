"""Tokenizer: fixed id layout, exact round trips, char and byte-fallback models, clear errors."""

import os
import pickle

import pytest

from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.tasks import builtin_text
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return builtin_text.write_builtin_corpus(str(tmp_path_factory.mktemp("tok") / "corpus.txt"), num_chars=20_000)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / f"{request.param}.model"
    return tok_lib.train_tokenizer(corpus, str(path), vocab_size=400, model_type=request.param)


TRICKY = [
    "Hello  world\n\n  leading and trailing  \n",
    "12 plus 345 is 357.\n",
    "\n\n\nx",
    " ",
    "a\tb\r\nc",
    'The cat said "hi," then left; 9876543210!',
]


def test_round_trip_on_corpus_and_tricky_text(tok, corpus):
    text = open(corpus).read()
    for chunk in [text[:3000], text[5000:5100], *TRICKY]:
        assert tok.decode(tok.encode(chunk)) == chunk


def test_encoding_is_concatenative(tok):
    a, b = "The cat sees", " the dog.\n12"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_digits_are_split(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_fixed_special_and_role_ids(tok):
    assert [tok.id_to_piece(i) for i in range(8)] == list(tok_lib.SPECIAL_PIECES)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.role_ids == {"system": 4, "user": 5, "assistant": 6, "end": 7}
    assert tok.encode("\n") == [8]
    assert tok.decode([tok.pad_id, *tok.encode("hi"), tok.pad_id]) == "hi"  # pad stripped


def test_literal_role_tags_in_text_are_not_role_ids(tok):
    text = "say <|end|> or <|assistant|> now"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.role_ids.values())
    assert tok.decode(ids) == text
    assert tok.encode_many(["x", text]) == [tok.encode("x"), ids]


def test_byte_fallback_encodes_unseen_unicode(tok):
    text = "naïve 日本語 🙂"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == text


def test_char_model_has_one_piece_per_character(tmp_path):
    text = "to be, or not to be:\nthat is the question.\n"
    path = tmp_path / "small.txt"
    path.write_text(text)
    tok = tok_lib.train_tokenizer(str(path), str(tmp_path / "char.model"), vocab_size=10, model_type="char")
    chars = set(text) - {"\n"}
    assert tok.vocab_size == 8 + 1 + 256 + len(chars)  # specials, newline, bytes, characters
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_training_is_deterministic(corpus, tmp_path):
    paths = [tmp_path / "a.model", tmp_path / "b.model"]
    for p in paths:
        tok_lib.train_tokenizer([corpus], str(p), vocab_size=350)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic write leaves no temp file


def test_pickles_as_path(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.path == tok.path and clone.encode("a cat") == tok.encode("a cat")


def test_missing_model_names_path_and_fix(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model.*train_tokenizer"):
        tok_lib.load_tokenizer(missing)


def test_too_small_vocab_says_what_is_needed(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*Raise vocab_size"):
        tok_lib.train_tokenizer(corpus, str(tmp_path / "x.model"), vocab_size=256)


def test_foreign_sentencepiece_model_uses_its_own_ids(corpus, tmp_path, caplog):
    """A SentencePiece model without our layout (LLaMA-style: unk 0, bos 1, eos 2, no pad) loads with the
    model's ids, pad falling back to eos (said once in the log), and no role ids. Its control pieces written in
    template text (a custom suffix "</s>") are their ids; in content they stay text."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=str(tmp_path / "plain"),
        vocab_size=100,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    tok = tok_lib.load_tokenizer(str(tmp_path / "plain.model"))
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, 2, 100)
    assert tok.role_ids == {} and not tok.fixed_layout
    ids = tok.encode("the cat sat")
    assert 2 not in ids and tok.decode(ids + [2]).strip() == "the cat sat"
    assert tok.encode_many(["a cat", "the dog"]) == [tok.encode("a cat"), tok.encode("the dog")]
    assert tok.encode_markup("<s>cat</s>") == [1, *tok.encode("cat"), 2] and 2 not in tok.encode("cat</s>")
    assert tok.named_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok_lib.load_tokenizer(str(tmp_path / "plain.model"))
    said = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert said == [f"{tok.path} has no pad token; padding with eos '</s>'."]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(corpus, tmp_path_factory):
    """A tiny GPT-2-style byte-level BPE tokenizer.json, trained here with the `tokenizers` package."""
    tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizer.json support needs the tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([corpus], trainer)
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    return str(d)


def test_hf_tokenizer_json_behind_the_same_interface(hf_tokenizer_dir):
    tok = tok_lib.load_tokenizer(hf_tokenizer_dir)  # a directory: its tokenizer.json
    assert isinstance(tok, tok_lib.HFTokenizer) and tok.path.endswith("tokenizer.json")
    assert tok.eos_id == tok.bos_id == tok.pad_id == 0 and tok.role_ids == {}
    assert tok.vocab_size == 400
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_many(TRICKY[:2]) == [tok.encode(t) for t in TRICKY[:2]]
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")  # special-token text in content stays text
    assert tok.decode(tok.encode("hi") + [tok.eos_id]) == "hi"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a cat") == tok.encode("a cat")


def test_hf_tokenizer_special_tokens_from_tokenizer_config(hf_tokenizer_dir, tmp_path):
    import json
    import shutil

    shutil.copy(os.path.join(hf_tokenizer_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "a"})
    )
    tok = tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == 0 and tok.pad_id == tok._tok.token_to_id("a") != 0
    assert tok.named_tokens == {"eos_token": "<|endoftext|>", "pad_token": "a"}  # a chat template's variables
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    os.remove(tmp_path / "tokenizer.json")
    import tokenizers

    bare = tokenizers.Tokenizer(tokenizers.models.BPE())
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-text token.*eos_token"):
        tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_without_pad_says_once_that_it_pads_with_eos(hf_tokenizer_dir, tmp_path, caplog):
    import shutil

    shutil.copy(os.path.join(hf_tokenizer_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    for _ in range(2):
        tok = tok_lib.load_tokenizer(str(tmp_path))
    said = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert tok.pad_id == tok.eos_id and said == [f"{tok.path} has no pad token; padding with eos '<|endoftext|>'."]


@pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARED_DATA, "tinyshakespeare.txt")),
    reason="shared reference data (tinyshakespeare.txt) is not on this machine",
)
def test_char_model_on_tinyshakespeare(tmp_path):
    path = os.path.join(SHARED_DATA, "tinyshakespeare.txt")
    tok = tok_lib.train_tokenizer(path, str(tmp_path / "char.model"), vocab_size=128, model_type="char")
    text = open(path).read()
    assert tok.vocab_size == 9 + 256 + len(set(text) - {"\n"})  # 65 characters, newline among them
    head = text[:20_000]
    ids = tok.encode(head)
    assert len(ids) == len(head) and tok.decode(ids) == head
