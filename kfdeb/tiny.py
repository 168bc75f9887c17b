"""Tiny DeBERTa-v2 models built offline: the smoke preset's model and the tests' fixture.

The architecture keeps every option of kf-deberta-base (relative attention, log position buckets (32, not 256),
p2c+c2p, shared attention keys, layer-normed relative embeddings, no token types, eps 1e-7) at
small sizes, with random weights. The tokenizer is a WordPiece vocabulary trained with
`tokenizers` on the bundled Korean sentences (no lowercasing, no accent stripping: both would
split Hangul syllables into jamo), [PAD] first so its id is 0, like kf-deberta-base's
BertTokenizer. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from kfdeb.data import BUNDLED_DATA_DIR, read_nli, read_sts

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bundled_sentences() -> list[str]:
    sentences: list[str] = []
    for split in ("train", "dev", "test"):
        for pair in read_sts(BUNDLED_DATA_DIR / "KorSTS" / f"sts-{split}.tsv"):
            sentences += [pair.sentence1, pair.sentence2]
    for path in sorted((BUNDLED_DATA_DIR / "KorNLI").glob("xnli.*.ko.tsv")):
        for first, second, _ in read_nli(path).pairs:
            sentences += [first, second]
    return list(dict.fromkeys(sentences))


def train_wordpiece(sentences: Iterable[str], vocab_size: int = 8000):
    """A BERT-style WordPiece tokenizer as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=512,
    )


def tiny_deberta_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                        intermediate_size: int = 128, dropout: float = 0.1, position_buckets: int = 32):
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=position_buckets,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        type_vocab_size=0,
        layer_norm_eps=1e-7,
        pad_token_id=0,
    )


def build_tiny_deberta(output_dir: str | os.PathLike, seed: int = 0, vocab_size: int = 8000,
                       model_vocab_size: int | None = None, **config) -> Path:
    """Write a random-weight DeBERTa-v2 + trained tokenizer as a plain Hugging Face folder.

    `config` overrides the tiny sizes (the benchmarks build kf-deberta-base's full shape this
    way); `model_vocab_size` gives the embedding more rows than the tokenizer uses (130000 as in
    kf-deberta-base, where the embedding is half the parameters and its optimizer cost matters).
    """
    from transformers import DebertaV2Model

    output_dir = Path(output_dir)
    tokenizer = train_wordpiece(bundled_sentences(), vocab_size)
    torch.manual_seed(seed)
    model = DebertaV2Model(tiny_deberta_config(max(len(tokenizer), model_vocab_size or 0), **config))
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
