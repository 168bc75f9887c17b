"""Tiny DeBERTa-v2 models built offline: the smoke preset's model and the tests' fixture.

The architecture keeps every option of kf-deberta-base (relative attention, log position buckets (32, not 256),
p2c+c2p, shared attention keys, layer-normed relative embeddings, no token types, eps 1e-7) at
small sizes, with random weights drawn after torch.manual_seed(seed): the same seed gives the
same weights. The tokenizer is BERT-style WordPiece (no lowercasing, no accent stripping: both
would split Hangul syllables into jamo; [PAD] first so its id is 0, like kf-deberta-base's
BertTokenizer) over `tiny_vocab.txt`, shipped with kfdeb: 8000 tokens, one per line, id = line
number, learnt once by `train_wordpiece(bundled_sentences(), 8000)` (tokenizers 0.23) and frozen.
It is shipped rather than learnt in every run because the `tokenizers` trainer breaks ties in
hash-map order, which changes from one process (and one call) to the next: two trainings on the
same sentences differed in 14 tokens and 4335 ids, and so did the models and scores built on
them. A WordPiece tokenizer is a pure function of its vocabulary (greedy longest match), so the
shipped one tokenizes exactly as the trainer's did. Other vocabulary sizes are learnt anew
(the throughput benchmarks' 32000), and are not reproducible run to run. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from kfdeb.readers import BUNDLED_DATA_DIR, read_nli, read_sts

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


TINY_VOCAB = Path(__file__).resolve().parent / "tiny_vocab.txt"


def _bert_wordpiece(model):
    """A `tokenizers` WordPiece model behind BERT's normalizer (case and accents kept) and pre-tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _as_transformers(tokenizer):
    """[CLS] ... [SEP] around each sentence, WordPiece decoding, wrapped for transformers."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

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


def train_wordpiece(sentences: Iterable[str], vocab_size: int = 8000):
    """A WordPiece tokenizer learnt on `sentences` (not reproducible: see the module docstring)."""
    from tokenizers import models, trainers

    tokenizer = _bert_wordpiece(models.WordPiece(unk_token="[UNK]"))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(sentences, trainer)
    return _as_transformers(tokenizer)


def shipped_wordpiece():
    """The tiny model's tokenizer: WordPiece over the shipped `tiny_vocab.txt` (deterministic)."""
    from tokenizers import models

    tokens = TINY_VOCAB.read_text(encoding="utf-8").splitlines()
    return _as_transformers(_bert_wordpiece(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]")))


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


def build_tiny_deberta(output_dir: str | os.PathLike, seed: int = 0, vocab_size: int | None = None,
                       model_vocab_size: int | None = None, **config) -> Path:
    """Write a random-weight DeBERTa-v2 + WordPiece tokenizer as a plain Hugging Face folder.

    vocab_size None: the shipped vocabulary (the same folder for the same arguments, byte for
    byte); a number: a vocabulary of that size learnt anew on the bundled sentences (not
    reproducible). `config` overrides the tiny sizes (the benchmarks build kf-deberta-base's full
    shape this way); `model_vocab_size` gives the embedding more rows than the tokenizer uses
    (130000 as in kf-deberta-base, where the embedding is half the parameters and its optimizer
    cost matters).
    """
    from safetensors.torch import save_file
    from transformers import DebertaV2Model

    output_dir = Path(output_dir)
    tokenizer = shipped_wordpiece() if vocab_size is None else train_wordpiece(bundled_sentences(), vocab_size)
    torch.manual_seed(seed)
    model = DebertaV2Model(tiny_deberta_config(max(len(tokenizer), model_vocab_size or 0), **config))
    # config and weights written here, not by model.save_pretrained: under an initialised process
    # group transformers 5 saves on global rank 0 only, and every rank of a torchrun job builds its
    # own copy (nodes share no disk); the same files save_pretrained writes for this model
    output_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures, model.config.dtype = [type(model).__name__], "float32"  # as save_pretrained records
    model.config.save_pretrained(output_dir)
    save_file(model.state_dict(), output_dir / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(output_dir)
    return output_dir
