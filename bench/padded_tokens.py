"""How many tokens each engine encodes for the retrieval bench's data (bench/retrieval_speed.py):
the real tokens, sentence-transformers' padded tokens (encode sorts by character length, batches of
32, each padded to its longest), kfdeb's (what `evaluate_retrieval` pads: the distinct texts,
tokenized by the encoder, in encode's windows, batches of 64 by `length_sorted_chunks`). Both
truncate at the model's max_seq_length. On a model bound by matrix multiplies the speed ratio of
two engines computing at the same rate per token is about this ratio.

    python bench/padded_tokens.py MODEL_FOLDER
"""

from __future__ import annotations

import sys

from retrieval_speed import dataset


def main() -> None:
    import kfdeb
    from kfdeb.batching import length_sorted_chunks
    from kfdeb.encoding import ENCODE_WINDOW

    encoder = kfdeb.load(sys.argv[1], device="cpu")
    queries, corpus, _ = dataset()

    def reference_padded(texts: list[str], lengths: list[int], batch: int = 32) -> int:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        return sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch]) for s in range(0, len(order), batch))

    def kfdeb_padded(texts: list[str], batch: int = 64) -> int:
        distinct = list(dict.fromkeys(texts))
        return sum(ids.numel() for start in range(0, len(distinct), ENCODE_WINDOW)
                   for ids in length_sorted_chunks(encoder.tokenize(distinct[start:start + ENCODE_WINDOW]), batch,
                                                   encoder.pad_id)[0])

    for name, texts in (("corpus", list(corpus.values())), ("queries", list(queries.values()))):
        lengths = [len(ids) for ids in encoder.tokenize(texts)]  # truncated at max_seq_length, as both engines do
        reference, kfdeb_tokens, real = reference_padded(texts, lengths), kfdeb_padded(texts), sum(lengths)
        print(f"{name}: {real:,} real tokens; padded: reference {reference:,}, kfdeb {kfdeb_tokens:,}; "
              f"ratio {reference / kfdeb_tokens:.3f}")


if __name__ == "__main__":
    main()
