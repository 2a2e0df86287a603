"""Corpus loading, tokenizers and LM windows: all offline."""
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from utils.data import ByteTokenizer, CharTokenizer, load_corpus, make_lm_dataset, make_tokenizer
from utils.models.examples import example_model


def test_default_corpus_is_pythons_own_english_docs():
    text = load_corpus()
    assert 400_000 < len(text) < 2_000_000
    assert "for" in text and text == load_corpus()  # deterministic


def test_corpus_from_a_file(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_corpus(path) == load_corpus(str(path)) == "héllo\nworld\n"


def test_a_file_that_is_not_utf8_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))  # é is the single byte 0xe9 in latin-1
    message = (f"load_corpus({str(path)!r}, encoding='utf-8'): {path} is not utf-8 text (byte 0xe9 at offset 3 "
               f"cannot be decoded). Re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 latin.txt > utf8.txt`), "
               f"or, from Python, pass its encoding: load_corpus({str(path)!r}, encoding='latin-1').")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_corpus(path)
    assert load_corpus(path, encoding="latin-1") == "caf\u00e9 au lait\n"


def test_an_unknown_encoding_is_a_value_error(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(
            f"load_corpus({str(path)!r}, encoding='utf-9'): 'utf-9' is not a text encoding Python knows. "
            "Pass a codec name such as 'utf-8', 'latin-1' or 'cp1252'.")):
        load_corpus(path, encoding="utf-9")


def test_corpus_from_a_string():
    assert load_corpus("just some words.txt and more") == "just some words.txt and more"


def test_corpus_path_that_does_not_exist():
    with pytest.raises(FileNotFoundError, match=re.escape("load_corpus('missing.txt'): no such file.")):
        load_corpus("missing.txt")
    with pytest.raises(FileNotFoundError, match=re.escape("no such file")):
        load_corpus(Path("missing"))


@pytest.mark.parametrize("source, message", [
    ("", "load_corpus(''): the text is empty."),
    (42, "load_corpus(42): pass None, a text file's path, or a string of text."),
])
def test_corpus_bad_sources(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_corpus(source)


@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == torch.long and (ids.numel() == 0 or int(ids.max()) < 256)
    assert tok.decode(ids) == text


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tok = make_tokenizer("char", text="hello world")
    assert tok.vocab_size == 8
    assert tok.decode(tok.encode("low")) == "low"
    with pytest.raises(ValueError, match=re.escape("1 character(s) not in the vocabulary, e.g. 'z'.")):
        tok.encode("zoo")


@pytest.mark.parametrize("args, message", [
    (("wordpiece",), "make_tokenizer('wordpiece'): unknown kind. Use 'byte' or 'char'."),
    (("char",), "make_tokenizer('char'): pass text= to build the character vocabulary from."),
])
def test_make_tokenizer_errors(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_tokenizer(*args)


def test_lm_windows_are_non_overlapping_and_split_at_the_end():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    train, val = make_lm_dataset(text, ByteTokenizer(), context=9, val_fraction=0.2)
    assert train.shape == (8, 10) and val.shape == (2, 10)
    flat = torch.cat([train, val]).flatten()
    assert torch.equal(flat, ByteTokenizer().encode(text))  # every token once, in order


def test_lm_dataset_fits_gpt_micro():
    data = make_lm_dataset(load_corpus(), ByteTokenizer(), context=64)
    model = example_model("gpt-micro")
    assert data.train.shape[1] == 65 and len(data.val) == pytest.approx(0.1 * (len(data.train) + len(data.val)), abs=1)
    assert model(data.train[:2, :-1]).shape == (2, 64, 256)


def test_lm_dataset_without_validation():
    train, val = make_lm_dataset("abcdefgh", ByteTokenizer(), context=3, val_fraction=0.0)
    assert train.shape == (2, 4) and val.shape == (0, 4)


def test_char_tokenized_dataset():
    text = "the cat sat on the mat " * 10
    train, _ = make_lm_dataset(text, CharTokenizer.from_text(text), context=15)
    assert int(train.max()) < CharTokenizer.from_text(text).vocab_size


@pytest.mark.parametrize("kwargs, message", [
    (dict(context=0), "make_lm_dataset(..., context=0, val_fraction=0.1): context must be a positive int."),
    (dict(context=4, val_fraction=1.0), "val_fraction must be in [0, 1)."),
    (dict(context=8), "the text has 10 tokens, but 2 window(s) of context + 1 = 9 tokens need 18. "
                      "Use more text or a shorter context."),
])
def test_lm_dataset_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_lm_dataset("0123456789", ByteTokenizer(), **kwargs)
