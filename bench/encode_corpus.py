"""encode on a large corpus: peak memory and sentences/s (streamed windows vs all at once).

    python bench/encode_corpus.py --model CKPT --sentences 200000

The corpus: the bundled KorSTS + XNLI sentences, each prefixed with its index so that all are
distinct, repeated up to --sentences. One process per measurement (its own peak RSS): the model
loads, the corpus is built, then `kfdeb.load(CKPT).encode(corpus, batch_size=64)`. Peak RSS minus
the RSS before encode is what encoding itself held: the output matrix plus token ids and batches.
To compare two versions of kfdeb, run the script with PYTHONPATH pointing at each checkout.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def rss_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sentences", type=int, default=200_000)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    import kfdeb
    from kfdeb.tiny import bundled_sentences

    base = bundled_sentences()
    corpus = [f"{i} {base[i % len(base)]}" for i in range(args.sentences)]
    model = kfdeb.load(args.model, device="cpu")
    before = rss_gb()
    started = time.perf_counter()
    embeddings = model.encode(corpus, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"kfdeb": kfdeb.__file__, "sentences": len(corpus), "seconds": round(seconds, 1),
                      "sentences_per_s": round(len(corpus) / seconds, 1), "rss_before_encode_gb": round(before, 3),
                      "peak_rss_gb": round(peak, 3), "encode_held_gb": round(peak - before, 3),
                      "output_gb": round(embeddings.numel() * 4 / 2**30, 3)}))


if __name__ == "__main__":
    main()
