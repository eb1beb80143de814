"""SentencePiece tokenizer: training from local text files and a thin, picklable wrapper.

Every model this module trains has the same fixed id layout, so data, models and
checkpoints can rely on it:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)
    4 <|system|>   5 <|user|>   6 <|assistant|>   7 <|end|>   (chat roles, one id each)
    8 "\\n"   (newlines are pieces, so text round-trips exactly)

then 256 byte-fallback pieces <0x00>..<0xFF> (when byte_fallback) and the learned pieces.

Existing tokenizers load behind the same interface (encode, encode_many, encode_markup, decode, bos_id,
eos_id, pad_id, vocab_size, role_ids, special_ids, named_tokens, path): a SentencePiece model without
this layout (e.g. a LLaMA `tokenizer.model`) takes bos/eos/pad from the model and has no role ids; a Hugging Face
`tokenizer.json` (GPT-2, GPT-NeoX) loads through the `tokenizers` package (`HFTokenizer`).
With `role_ids` empty, chat templates render roles as text (rlhf_jax/data/chat.py).

Whitespace is kept verbatim (identity normalisation, no extra-whitespace removal, no
dummy prefix), so `decode(encode(text)) == text` and encoding is concatenative:
`decode(encode(a) + encode(b)) == a + b`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
NEWLINE_PIECE = "\n"
# Pieces with fixed ids 0..7, in id order.
SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>", *ROLE_PIECES.values())
MODEL_TYPES = ("bpe", "unigram", "char")
_USER_SYMBOLS = (*ROLE_PIECES.values(), NEWLINE_PIECE)
_NUM_RESERVED = 4 + len(_USER_SYMBOLS)  # pieces before byte fallback and learned pieces
_TAG_RE = re.compile("|".join(re.escape(t) for t in ROLE_PIECES.values()))
_log = logging.getLogger(__name__)


class Tokenizer:
    """A SentencePiece model loaded from a local `.model` file (pickles as its path).

    A model from `train_tokenizer` has the fixed layout above and role ids. Any other SentencePiece
    model (e.g. LLaMA's) keeps its own bos/eos/pad ids — pad falls back to eos when the model has none —
    and has no role ids. Its control pieces (<s>, </s>) and role tags are its special tokens.
    """

    kind = "sentencepiece"

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.fixed_layout = _has_fixed_layout(self._sp)
        sp = self._sp
        self.special_ids: dict[str, int] = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        named = _special_tokens_config(os.path.dirname(self.path))
        if self.fixed_layout:
            self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
            self.role_ids: dict[str, int] = {role: self._sp.piece_to_id(p) for role, p in ROLE_PIECES.items()}
            self.special_ids |= {ROLE_PIECES[role]: i for role, i in self.role_ids.items()}
            self.special_re = _special_re(self.special_ids)
            self.named_tokens = _named_tokens(self, named)
            return
        self.special_re = _special_re(self.special_ids)
        if sp.eos_id() < 0:
            raise ValueError(
                f"{path}: this SentencePiece model defines no eos piece; a tokenizer needs one "
                f"to end sequences. Train it with eos_id set."
            )
        self.unk_id, self.bos_id, self.eos_id = sp.unk_id(), sp.bos_id(), sp.eos_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
        if sp.pad_id() < 0:
            _say_pad_is_eos(self.path, sp.id_to_piece(self.eos_id))
        self.role_ids = {}
        self.named_tokens = _named_tokens(self, named)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos). Role tags written literally in `text` are encoded
        as ordinary characters, never as the role ids, so content cannot forge a chat turn."""
        if not self.role_ids or "<|" not in text or not _TAG_RE.search(text):
            return self._sp.encode(text)
        ids, start = [], 0
        for m in _TAG_RE.finditer(text):
            # "<" and "|end|>" encoded apart: neither contains a whole tag, and the text
            # decodes back unchanged because encoding is concatenative.
            ids += self._sp.encode(text[start : m.start()]) + self._sp.encode("<") + self._sp.encode(m.group()[1:])
            start = m.end()
        return ids + self._sp.encode(text[start:])

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over a list (one call into SentencePiece when no text holds a role tag)."""
        if self.role_ids and any("<|" in t for t in texts):
            return [self.encode(t) for t in texts]
        return self._sp.encode(list(texts))

    def encode_markup(self, text: str) -> list[int]:
        """Ids of template text: role tags and control pieces (<s>, </s>) in it are those ids (never use this
        for content; SentencePiece itself never reads control pieces from text)."""
        return _encode_markup(self, text)

    def special_id(self, piece: str) -> int:
        """The id of special piece `piece` (e.g. "<|end|>"); ValueError when the model has none."""
        i = self._sp.piece_to_id(piece)
        if i == self.unk_id and piece != self.id_to_piece(self.unk_id):
            raise ValueError(
                f"{self.path}: no special token {piece!r}; this chat template needs a tokenizer "
                f"that has it (e.g. the checkpoint's own tokenizer)."
            )
        return i

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad ids are dropped, bos/eos render as nothing, role tags as their text."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def decode_markup(self, ids: Iterable[int]) -> str:
        """`decode`: role tags already render as their text."""
        return self.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. GPT-2's or GPT-NeoX's BPE) through the `tokenizers` package.

    bos/eos/pad come from a `tokenizer_config.json` beside the file when there is one, else from the
    added special tokens with a well-known name ("<|endoftext|>", "</s>", ...); pad falls back to eos (said
    once in the log), bos to eos. No role ids. Special-token text inside `encode`'s input is encoded as plain text, so
    content cannot forge an end of text.
    """

    kind = "hf"
    _EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
    _BOS = ("<s>", "<|begin_of_text|>", "<bos>")

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"{path} is a Hugging Face tokenizer.json; reading it needs the `tokenizers` "
                f"package: pip install tokenizers."
            ) from e
        self.path = os.path.abspath(path)
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self._tok.encode_special_tokens = True
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        named = _special_tokens_config(os.path.dirname(self.path))
        ids = {}
        for role, known in (("eos", self._EOS), ("bos", self._BOS), ("pad", ()), ("unk", ("<unk>",))):
            for piece in ([named[role]] if named.get(role) else []) + list(known):
                if self._tok.token_to_id(piece) is not None:
                    ids[role] = self._tok.token_to_id(piece)
                    break
        if "eos" not in ids:
            raise ValueError(
                f"{path}: no end-of-text token found (looked for {self._EOS} and for eos_token in a "
                f"tokenizer_config.json beside it). Add eos_token to that tokenizer_config.json."
            )
        self.eos_id = ids["eos"]
        self.bos_id, self.pad_id, self.unk_id = ids.get("bos", self.eos_id), ids.get("pad", self.eos_id), ids.get("unk")
        if "pad" not in ids:
            _say_pad_is_eos(self.path, self.id_to_piece(self.eos_id))
        self.role_ids: dict[str, int] = {}
        self.special_ids: dict[str, int] = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.special_re = _special_re(self.special_ids)
        # What transformers passes a chat template as bos_token, eos_token, ...: tokenizer_config.json's names.
        self.named_tokens = {f"{role}_token": text for role, text in named.items()}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_markup(self, text: str) -> list[int]:
        """Ids of template text, e.g. "<|im_start|>user\n": special-token text in it is that token
        (`encode` keeps such text plain, so content cannot forge a turn). Never use this for content."""
        return _encode_markup(self, text)

    def special_id(self, piece: str) -> int:
        """The id of special token `piece` (e.g. "<|im_end|>"); ValueError when the tokenizer has none."""
        if piece not in self.special_ids:
            raise ValueError(
                f"{self.path}: no special token {piece!r} (it has {sorted(self.special_ids)[:8]}); "
                f"this chat template needs a tokenizer that has it, e.g. "
                f"--config.data.chat_template=hh for a plain-text one."
            )
        return self.special_ids[piece]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad ids are dropped and special tokens render as nothing."""
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=True)

    def decode_markup(self, ids: Iterable[int]) -> str:
        """Text of `ids` with every special token as its text (a chat prompt's markers), pad ids too."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


# In a Hugging Face model directory, the tokenizer file to use: SentencePiece first (the project default).
DIR_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def tokenizer_file_in(directory: str) -> str | None:
    """The tokenizer file of a model directory (tokenizer.model, else tokenizer.json), or None."""
    for name in DIR_TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def load_tokenizer(path: str) -> Tokenizer | HFTokenizer:
    """Loads a SentencePiece `.model` or a Hugging Face `tokenizer.json`, told apart by content (a JSON
    file starts with "{"), so a run's copy keeps one name whatever it holds; a directory means the
    tokenizer file inside it (`tokenizer_file_in`)."""
    if os.path.isdir(path) and tokenizer_file_in(path):
        path = tokenizer_file_in(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer model {path!r} does not exist. Create one with "
            f"rlhf_jax.data.tokenizer.train_tokenizer(text_paths, {path!r}, vocab_size) "
            f"or point the config at an existing .model file (or a tokenizer.json)."
        )
    with open(path, "rb") as f:
        is_json = f.read(64).lstrip().startswith(b"{")
    return HFTokenizer(path) if is_json else Tokenizer(path)


def train_tokenizer(
    text_paths: list[str] | str,
    model_path: str,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_sentence_length: int = 16384,
    character_coverage: float = 1.0,
    num_threads: int = 1,
) -> Tokenizer:
    """Trains a SentencePiece model on local text files and writes `model_path` atomically.

    vocab_size: total pieces, including the reserved pieces and byte fallback. For "char"
      it is ignored: the vocabulary is every character of the corpus plus reserved/byte pieces.
    max_sentence_length: bytes; longer lines are split into chunks for training only.
    num_threads: kept at 1 by default so the same corpus gives a byte-identical model anywhere
      (the thread count is stored in the model and can change unigram training).
    """
    paths = [text_paths] if isinstance(text_paths, str) else list(text_paths)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; use one of {MODEL_TYPES}.")
    if not paths:
        raise ValueError("train_tokenizer: text_paths is empty; pass at least one local text file.")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tokenizer training text {p!r} does not exist; pass a local text file.")
    chars = _corpus_chars(paths, max_sentence_length)
    if not chars:
        raise ValueError(f"tokenizer training text {paths} contains no characters besides newlines.")
    reserved = _NUM_RESERVED + (256 if byte_fallback else 0)
    if model_type == "char":
        vocab_size = reserved + len(chars)
    elif character_coverage >= 1.0 and vocab_size < reserved + len(chars):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a {model_type} tokenizer of {paths}: it needs "
            f"{reserved} reserved pieces ({_NUM_RESERVED} fixed"
            + (" + 256 byte fallback" if byte_fallback else "")
            + f") + {len(chars)} distinct characters = {reserved + len(chars)}. "
            f"Raise vocab_size (or pass byte_fallback=False)."
        )

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(paths, max_sentence_length),
            model_writer=buf,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=model_type != "char",
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=list(_USER_SYMBOLS),
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size} on {paths}: {e}"
        ) from e
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp = f"{model_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, model_path)
    return Tokenizer(model_path)


def _sentences(paths: list[str], max_sentence_length: int) -> Iterator[str]:
    """Lines of the corpus without their newline (newline is a fixed piece), empty lines
    skipped, long lines chunked so SentencePiece does not silently drop them."""
    chunk = max(1, max_sentence_length // 4)  # characters; UTF-8 uses at most 4 bytes each
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                for i in range(0, len(line), chunk):
                    yield line[i : i + chunk]


def _corpus_chars(paths: list[str], max_sentence_length: int) -> set[str]:
    chars: set[str] = set()
    for s in _sentences(paths, max_sentence_length):
        chars.update(s)
    return chars


def _special_re(special_ids: dict[str, int]) -> re.Pattern:
    """Any special token's text, longest first; never matches when there are none."""
    return re.compile("|".join(map(re.escape, sorted(special_ids, key=len, reverse=True))) or "(?!)")


def _encode_markup(tok, text: str) -> list[int]:
    ids, start = [], 0
    for m in tok.special_re.finditer(text):
        ids += tok.encode(text[start : m.start()]) + [tok.special_ids[m.group()]]
        start = m.end()
    return ids + tok.encode(text[start:])


def _named_tokens(tok: Tokenizer, named: dict[str, str]) -> dict[str, str]:
    """bos_token, eos_token, ... of a SentencePiece model (a tokenizer_config.json beside it overrides them)."""
    sp = tok._sp
    own = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": sp.pad_id()}
    return {f"{role}_token": sp.id_to_piece(i) for role, i in own.items() if i >= 0} | {
        f"{role}_token": text for role, text in named.items()
    }


@functools.cache
def _say_pad_is_eos(path: str, eos: str) -> None:
    """Logs once per tokenizer file that it has no pad token, so padding uses eos."""
    _log.warning("%s has no pad token; padding with eos %r.", path, eos)


def _has_fixed_layout(sp: spm.SentencePieceProcessor) -> bool:
    found = tuple(sp.id_to_piece(i) for i in range(min(len(SPECIAL_PIECES), sp.get_piece_size())))
    return found == SPECIAL_PIECES


def _special_tokens_config(directory: str) -> dict[str, str]:
    """{"bos" | "eos" | "pad" | "unk": token text} from a tokenizer_config.json in `directory` (HF layout)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        cfg = json.load(f)
    out = {}
    for role in ("bos", "eos", "pad", "unk"):
        v = cfg.get(f"{role}_token")
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[role] = v
    return out
