"""Tokenizers: char (<PAD>/<UNK>, JSON), byte-level BPE (exact round trips), HF tokenizer.json."""

import json
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from llmfn.data import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    bpe_tokenizer,
    build_tokenizer,
    char_tokenizer,
    load_tokenizer,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Hello, World! héllo wörld — ünïcödé ✓ 🎉\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n",
] * 20


@cache
def small_bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


# --- character tokenizer ----------------------------------------------------------------------
def test_char_specials_and_round_trip():
    tok = CharTokenizer.train(CORPUS)
    assert (tok.pad_id, tok.unk_id, tok.eos_id, tok.bos_id) == (0, 1, 2, None)
    text = "def push(self, a):\n    return ünïcödé 🎉"
    ids = tok.encode(text)
    assert len(ids) == len(text) and min(ids) >= 3  # every char seen: no specials
    assert tok.decode(ids) == text
    assert isinstance(tok, Tokenizer)


def test_char_unseen_characters_become_unk_not_keyerror():
    tok = CharTokenizer.train(["abc"])
    ids = tok.encode("abXc\u4e2d")
    assert ids == [tok.encode("a")[0], tok.encode("b")[0], 1, tok.encode("c")[0], 1]
    assert tok.decode(ids) == "ab\ufffdc\ufffd"


def test_char_vocab_is_ranked_by_frequency_and_capped():
    tok = CharTokenizer.train(["aaaa bb c"], max_vocab_size=5)  # 3 specials + 2 chars
    assert tok.vocab_size == 5 and tok.chars == ["a", " "]
    assert tok.encode("abc") == [3, 1, 1]


def test_char_save_load_round_trip(tmp_path):
    tok = CharTokenizer.train(CORPUS)
    tok.save(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["type"] == "llmfn-char" and data["specials"][:2] == ["<PAD>", "<UNK>"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, CharTokenizer) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(CORPUS[1]) == tok.encode(CORPUS[1])
    assert load_tokenizer(tmp_path / "tok" / "tokenizer.json").chars == tok.chars


def test_char_decode_skips_pad_and_eos_and_rejects_bad_ids():
    tok = CharTokenizer.train(["ab"])
    assert tok.decode([0, tok.encode("a")[0], 2, tok.encode("b")[0], 0]) == "ab"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])


# --- byte-level BPE ---------------------------------------------------------------------------
@settings(max_examples=60)
@given(st.text())
def test_bpe_round_trips_any_unicode(text):
    tok = small_bpe()
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=20)
@given(st.lists(st.text(max_size=40), max_size=6))
def test_bpe_encode_batch_matches_encode(texts):
    tok = small_bpe()
    assert tok.encode_batch(texts) == [tok.encode(text) for text in texts]


def test_bpe_no_lowercasing_and_special_strings_stay_text():
    tok = small_bpe()
    assert tok.decode(tok.encode("Hello WORLD")) == "Hello WORLD"
    assert tok.encode("Hello") != tok.encode("hello")
    text = "a<|endoftext|>b<|pad|>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.pad_id not in ids  # data cannot inject control tokens
    assert tok.decode(ids) == text


def test_bpe_vocab_size_and_special_ids():
    tok = small_bpe()
    assert 258 < tok.vocab_size <= 400
    assert tok.backend.id_to_token(tok.eos_id) == "<|endoftext|>"
    assert tok.backend.id_to_token(tok.pad_id) == "<|pad|>"
    assert tok.bos_id is None
    assert len(tok.encode("def add(a, b):\n    return a + b\n")) < 20  # merges were learned
    assert tok.decode([tok.eos_id, *tok.encode("x"), tok.pad_id]) == "x"  # specials skipped


def test_bpe_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 258"):
        BPETokenizer.train(CORPUS, vocab_size=100)


def test_min_vocab_sizes_are_what_training_needs():
    """prepare checks --vocab-size against these before any work."""
    assert BPETokenizer.train(CORPUS, vocab_size=bpe_tokenizer.MIN_VOCAB_SIZE).vocab_size <= 258
    assert CharTokenizer.train(CORPUS, max_vocab_size=char_tokenizer.MIN_VOCAB_SIZE).vocab_size == 4
    with pytest.raises(ValueError, match="too small"):
        BPETokenizer.train(CORPUS, vocab_size=bpe_tokenizer.MIN_VOCAB_SIZE - 1)
    with pytest.raises(ValueError, match="must exceed the 3 special tokens"):
        CharTokenizer.train(CORPUS, max_vocab_size=char_tokenizer.MIN_VOCAB_SIZE - 1)


def test_bpe_save_load_is_a_standard_tokenizer_json(tmp_path):
    tok = small_bpe()
    tok.save(tmp_path / "bpe")
    raw = HFTokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))  # the library reads it
    assert raw.get_vocab_size() == tok.vocab_size
    loaded = load_tokenizer(tmp_path / "bpe")
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id) == (tok.eos_id, tok.pad_id, None)
    for text in CORPUS[:3] + ["unseen ✓ text"]:
        assert loaded.encode(text) == tok.encode(text)


@pytest.mark.slow  # importing transformers alone takes 10-40 s on a busy 2-core machine
def test_bpe_saved_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    small_bpe().save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    for text in ("def f(x):", "a<|endoftext|>b <|pad|>"):  # special strings stay text there too
        assert hf.encode(text, add_special_tokens=False) == small_bpe().encode(text)


# --- any HF tokenizer.json --------------------------------------------------------------------
def word_level_file(folder, with_config: bool):
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<sep>": 4, "hello": 5, "world": 6}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if with_config:
        config = {"eos_token": {"content": "<sep>"}, "bos_token": "<s>", "pad_token": None}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def test_loads_any_hf_tokenizer_json_with_known_special_names(tmp_path):
    tok = load_tokenizer(word_level_file(tmp_path / "wl", with_config=False))
    assert tok.vocab_size == 7
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.encode("hello world nope") == [5, 6, 0]


def test_tokenizer_config_names_the_special_tokens(tmp_path):
    tok = load_tokenizer(word_level_file(tmp_path / "wl", with_config=True))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 4, 3)  # eos from the config, pad by name


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json"):
        load_tokenizer(tmp_path / "nope")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json cannot be read as JSON"):
        load_tokenizer(bad)
    bad.write_text('{"hello": 1}')
    with pytest.raises(
        ValueError, match="neither an llmfn char tokenizer nor an HF tokenizer.json"
    ):
        load_tokenizer(tmp_path)


def test_a_folder_without_tokenizer_json_says_so(tmp_path):
    (tmp_path / "tk").mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder '.*tk' holds no tokenizer.json"):
        load_tokenizer(tmp_path / "tk")


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"chars": [1, 2]}, "'chars' must be a list of single characters (entry 0 is int 1)"),
     ({"chars": ["a", "bc"]}, "'chars' must be a list of single characters (entry 1 is str 'bc')"),
     ({"chars": "abc"}, "'chars' must be a list of single characters (got str)"),
     ({"chars": None}, "'chars' must be a list of single characters (got null)"),
     ({}, "'chars' is missing: expected a list of single characters"),
     ({"chars": ["a", "b", "a"]}, "'chars' lists 'a' twice (entries 0 and 2)"),
     ({"chars": ["a"], "specials": 5}, "'specials' is 5: expected [\"<PAD>\", \"<UNK>\", \"<|endoftext|>\"]"),
     ({"chars": ["a"], "specials": None}, "'specials' is null: expected"),
     ({"chars": ["a"], "specials": ["<PAD>"]}, "'specials' is [\"<PAD>\"]: expected")],
)  # fmt: skip
def test_a_malformed_char_tokenizer_names_the_file_and_field(tmp_path, fields, message):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "llmfn-char", **fields}))
    with pytest.raises(ValueError) as caught:
        load_tokenizer(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'tokenizer.json'}: {message}")


@pytest.mark.parametrize(
    ("config", "message"),
    [(b"[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
     (b'"eos"', "tokenizer_config.json: expected a JSON object, got str"),
     (b'{"eos_token": "\xff"}', "tokenizer_config.json: cannot be read as JSON ('utf-8' codec"),
     (b'{"eos_token": 5}', "tokenizer_config.json: 'eos_token' is 5: expected a token string"),
     (b'{"pad_token": {"content": ["x"]}}', "tokenizer_config.json: 'pad_token' is {\"content\": [\"x\"]}")],
)  # fmt: skip
def test_a_malformed_tokenizer_config_names_the_file(tmp_path, config, message):
    tokenizer = word_level_file(tmp_path / "wl", with_config=False)
    (tokenizer.parent / "tokenizer_config.json").write_bytes(config)
    with pytest.raises(ValueError) as caught:
        load_tokenizer(tokenizer)
    assert str(caught.value).startswith(f"{tokenizer.parent}/{message}")


def test_build_tokenizer_chooses_by_spec(tmp_path):
    texts = lambda: iter(CORPUS)  # noqa: E731
    assert isinstance(build_tokenizer("char", texts, vocab_size=1000), CharTokenizer)
    bpe = build_tokenizer("bpe", texts, vocab_size=300)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size <= 300
    bpe.save(tmp_path)
    assert (
        build_tokenizer(str(tmp_path / "tokenizer.json"), texts, vocab_size=1).vocab_size
        == bpe.vocab_size
    )
