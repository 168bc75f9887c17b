"""The tiny offline model (kfdeb/tiny.py): a reproducible folder, and a tokenizer that is its vocabulary's WordPiece."""

from __future__ import annotations

import string
import unicodedata

from kfdeb.tiny import TINY_VOCAB, build_tiny_deberta, bundled_sentences, shipped_wordpiece


def test_the_same_seed_builds_the_same_folder_byte_for_byte(tmp_path):
    first = build_tiny_deberta(tmp_path / "first", seed=3)
    second = build_tiny_deberta(tmp_path / "second", seed=3)
    other_seed = build_tiny_deberta(tmp_path / "other", seed=4)
    names = sorted(p.name for p in first.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (other_seed / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert (other_seed / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def is_cjk_ideograph(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def naive_wordpiece(sentence: str, vocab: dict[str, int], max_chars: int = 100) -> list[int]:
    """BERT's basic split (whitespace; punctuation and CJK ideographs stand alone), then greedy
    longest-match-first pieces with the ## continuation prefix; a word with no split is [UNK]."""
    words, current = [], ""
    for char in sentence:
        if char.isspace() or is_punctuation(char) or is_cjk_ideograph(char):
            words += [current] if current else []
            current = ""
            if not char.isspace():
                words.append(char)
        elif unicodedata.category(char) not in ("Cc", "Cf") and char not in ("\0", "\ufffd"):
            current += char
    words += [current] if current else []
    ids = [vocab["[CLS]"]]
    for word in words:
        pieces, start = [], 0
        while start < len(word) and len(word) <= max_chars:
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces if start == len(word) and pieces else [vocab["[UNK]"]]
    return ids + [vocab["[SEP]"]]


def test_the_shipped_tokenizer_is_the_wordpiece_of_its_vocabulary():
    tokens = TINY_VOCAB.read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(tokens) == len(vocab) == 8000 and tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = shipped_wordpiece()
    assert len(tokenizer) == 8000 and tokenizer.pad_token_id == 0
    sentences = bundled_sentences()[::10]
    ours = tokenizer(sentences)["input_ids"]
    assert ours == [naive_wordpiece(s, vocab) for s in sentences]
    assert sum(ids.count(vocab["[UNK]"]) for ids in ours) == 0  # the vocabulary covers the bundled text
