"""Retrieval evaluation at a million documents (issue 25, part 3): what `evaluate.py --ir_data` takes in
memory and time on a corpus of real size, on a 24 GB machine.

The pipeline at full scale, the model's compute aside: a BEIR folder of N documents (default 1,000,000)
and Q queries (default 10,000) is written to disk, then `evaluate.py MODEL --ir_data FOLDER` runs in a
fresh process under `/usr/bin/time -v` (peak resident memory, wall time). It reads the JSONL, checks
every row, deduplicates, tokenizes every text with a real tokenizer, streams the encode, keeps the
N x H float32 embeddings, searches exactly and scores. The model: multilingual-e5-small's XLM-R
tokenizer and vocabulary (250k x 768 embeddings, as large as a base model's) with **hidden size 768
and no transformer layer** (random weights), so that the embeddings are the width of kf-deberta-base's
and everything but the layers' arithmetic is measured. The layers' time is then added from the
throughput the full model reaches on this machine (--tokens_per_second, measured by
bench/retrieval_speed.py), over the number of tokens the corpus holds (counted here).

Documents: two distinct bundled sentences joined by a space (about 2 x 25k x 25k combinations, taken
in a fixed pseudo-random order), so lengths and characters are real Korean sentences'; each query is
the first sentence of one document, that document its one relevant document (binary grade). The
figures are not the point (many documents share a first sentence).

    python bench/ir_scale.py --documents 1000000 --queries 10000
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, bundled_sentences, git_commit, model_path


def write_beir(folder: Path, documents: int, queries: int, seed: int = 0) -> None:
    sentences = bundled_sentences()
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    (folder / "qrels").mkdir(parents=True)
    firsts = []
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as corpus:
        while len(seen) < documents:
            pair = (rng.randrange(len(sentences)), rng.randrange(len(sentences)))
            if pair[0] == pair[1] or pair in seen:
                continue
            seen.add(pair)
            doc = len(seen) - 1
            corpus.write(json.dumps({"_id": f"d{doc}", "title": "", "text": f"{sentences[pair[0]]} {sentences[pair[1]]}"},
                                    ensure_ascii=False) + "\n")
            if len(firsts) < queries and doc % max(1, documents // queries) == 0:
                firsts.append((doc, sentences[pair[0]]))
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps({"_id": f"q{doc}", "text": text}, ensure_ascii=False) + "\n" for doc, text in firsts)
    with (folder / "qrels" / "test.tsv").open("w", encoding="utf-8") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        out.writelines(f"q{doc}\td{doc}\t1\n" for doc, _ in firsts)


def layerless_model(folder: Path, tokenizer_from: Path) -> None:
    """XLM-R with e5's tokenizer and vocabulary, hidden 768, no transformer layer, random weights."""
    import shutil

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=250037, hidden_size=768, num_hidden_layers=0, num_attention_heads=12,
                              intermediate_size=3072, max_position_embeddings=514, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tokens_per_second", type=float, nargs="*", default=[],
                        help="NAME=RATE: a full model's encoding throughput here, to estimate its time")
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"))
    parser.add_argument("--work", default=None, help="where the folder and model go (default: a temporary folder)")
    args = parser.parse_args()
    e5 = Path(model_path("e5", Path(args.cache)))
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        started = time.perf_counter()
        write_beir(work / "data", args.documents, args.queries)
        megabytes = (work / "data" / "corpus.jsonl").stat().st_size / 2**20
        print(f"wrote {args.documents:,} documents ({megabytes:.0f} MB of JSONL) and {args.queries:,} queries in "
              f"{time.perf_counter() - started:.0f} s; commit {git_commit()}", flush=True)
        layerless_model(work / "model", e5)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
        texts = [json.loads(line)["text"] for line in (work / "data" / "corpus.jsonl").open(encoding="utf-8")]
        tokens = sum(len(ids) for start in range(0, len(texts), 50_000)
                     for ids in tokenizer(texts[start:start + 50_000], truncation=True, max_length=512)["input_ids"])
        del texts
        print(f"the corpus holds {tokens:,} tokens ({tokens / args.documents:.1f} a document, e5's tokenizer)", flush=True)
        command = ["/usr/bin/time", "-v", sys.executable, str(REPO / "evaluate.py"), str(work / "model"), "--ir_data",
                   str(work / "data"), "--batch_size", str(args.batch_size), "--device", "cpu", "--json",
                   str(work / "figures.json")]
        result = subprocess.run(command, capture_output=True, text=True)
        print(result.stdout[-2000:])
        if result.returncode:
            sys.exit(result.stderr[-4000:])
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr).group(1)
        print(f"evaluate.py --ir_data, {args.documents:,} documents x 768: peak resident memory {peak_kb / 2**20:.2f} GiB, "
              f"wall {wall}")
        for entry in args.tokens_per_second:
            name, rate = entry.split("=")
            print(f"estimated with {name}'s layers at {float(rate):,.0f} tokens/s: + {tokens / float(rate) / 3600:.1f} h")


if __name__ == "__main__":
    main()
