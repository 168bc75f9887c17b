"""How many tokens each engine encodes for the retrieval bench's data (bench/retrieval_speed.py):
the real tokens, sentence-transformers' padded tokens (encode sorts by character length, batches of
32, each padded to its longest), kfdeb's (distinct texts sorted by token length, batches of 64).
On a model bound by matrix multiplies the speed ratio of two exact fp32 engines is about this ratio.

    python bench/padded_tokens.py MODEL_FOLDER
"""

from __future__ import annotations

import sys

from transformers import AutoTokenizer

from retrieval_speed import dataset


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    queries, corpus, _ = dataset()

    def lengths(texts: list[str]) -> list[int]:
        return [min(len(ids), 256) for ids in tokenizer(texts)["input_ids"]]  # 256: both engines' truncation here

    def reference_padded(texts: list[str], batch: int = 32) -> int:
        order, n = sorted(range(len(texts)), key=lambda i: -len(texts[i])), lengths(texts)
        return sum(max(n[i] for i in order[s:s + batch]) * len(order[s:s + batch]) for s in range(0, len(order), batch))

    def kfdeb_padded(texts: list[str], batch: int = 64) -> int:
        n = sorted(lengths(list(dict.fromkeys(texts))))
        return sum(max(n[s:s + batch]) * len(n[s:s + batch]) for s in range(0, len(n), batch))

    for name, texts in (("corpus", list(corpus.values())), ("queries", list(queries.values()))):
        reference, kfdeb = reference_padded(texts), kfdeb_padded(texts)
        print(f"{name}: {sum(lengths(texts)):,} real tokens; padded: reference {reference:,}, kfdeb {kfdeb:,}; "
              f"ratio {reference / kfdeb:.3f}")


if __name__ == "__main__":
    main()
