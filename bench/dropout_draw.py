"""Do kfdeb's training forward and the reference's draw the same dropout? (train mode, no gradients)

The whole-run parity bench varies the draw: batches and dropout masks. The deterministic comparison
(`train_vs_reference.py --no_dropout`) fixes the batches and turns dropout off, so it cannot see a
forward that applies dropout differently (another attention kernel, another grouping of the
sentences). This bench looks at exactly that. It takes the model as published, fixed batches, and
train mode. It computes two means over many dropout draws:
    STS: mean over pairs of (cos(u, v) - label)^2          (the reference's CosineSimilarityLoss)
    NLI: mean over batches of CE(20 * cos(a_i, [p; n]_j), i) (MultipleNegativesRankingLoss, hard negatives)
The embeddings come from two paths. kfdeb: `kfdeb.loop.embed_columns`, as the training loop calls it
(all columns in one call, length-sorted chunks). The reference: one model call per column, each
padded to its longest, as sentence-transformers' losses call it. The same formula (float32) scores
both, so only the forward differs. Eval mode first: there the two must agree to rounding. Under
dropout, each path's mean over D draws has a standard error of sd / sqrt(D), given.

Data: 400 KorSTS train pairs (50 batches of 8) and 4 batches of 64 XNLI triplets, drawn with seed 0.
Both models start from the bare HF encoder with mean pooling, max_seq_length 128, as in
`whole_run_parity.py`.

With `--spread_batches N` it also gives how much one batch's loss varies from batch to batch (eval
mode, kfdeb's path): over N more NLI batches of 64 and all KorSTS train pairs in shuffled batches of 8.

    python bench/dropout_draw.py --model e5 --draws 10                          # ~8 min on 2 CPU cores
    python bench/dropout_draw.py --model e5 --draws 0 --spread_batches 70       # ~5 min
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path

from harness import REPO, git_commit, model_path
from whole_run_parity import bare_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5", help="model folder, minilm or e5 (its bare HF encoder is used)")
    parser.add_argument("--draws", type=int, default=10, help="dropout draws per path")
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"), help="where e5 is built")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--spread_batches", type=int, default=0,
                        help="also: the sd from batch to batch of both losses, eval mode, over N more NLI batches "
                             "and every KorSTS train batch of 8 (what one training step's loss varies by at the start)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer, models

    from kfdeb.batching import nli_triplets_of_files, number_texts
    from kfdeb.distributed import Context
    from kfdeb.loop import embed_columns
    from kfdeb.model import load_encoder
    from kfdeb.readers import BUNDLED_DATA_DIR, read_nli, read_sts
    from kfdeb.tasks import Task

    folder = str(bare_encoder(Path(model_path(args.model, Path(args.cache))), Path(args.cache) / f"{args.model}-bare"))
    kfdeb_model = load_encoder(folder, max_seq_length=args.max_seq_length)
    transformer = models.Transformer(folder, max_seq_length=args.max_seq_length)
    reference = SentenceTransformer(modules=[transformer, models.Pooling(kfdeb_model.dimension, "mean")], device="cpu")
    ctx = Context(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    print(f"model {args.model} ({folder}), attention {kfdeb_model.transformer.config._attn_implementation} / "
          f"{transformer.auto_model.config._attn_implementation}, {torch.get_num_threads()} threads, "
          f"commit {git_commit()}", flush=True)

    def kfdeb_embed(columns: list[list[str]]) -> torch.Tensor:  # columns x batch x H, as the loop embeds a batch
        rows, texts = number_texts(list(zip(*columns)))
        task = Task(name="batch", rows=rows, sequences=kfdeb_model.tokenize(texts), labels=None, sampler=None,
                    batch_size=len(rows))
        return embed_columns(kfdeb_model, task, rows, ctx, kfdeb_model.pad_id, 1)

    def reference_embed(columns: list[list[str]]) -> torch.Tensor:  # one call per column, as its losses do
        return torch.stack([reference(reference.tokenize(column))["sentence_embedding"] for column in columns])

    draw = random.Random(0)
    sts = draw.sample(read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-train.tsv"), 400)
    sts_batches = [sts[i:i + 8] for i in range(0, len(sts), 8)]
    nli_files = sorted((BUNDLED_DATA_DIR / "KorNLI").glob("xnli.*.ko.tsv"))
    triplets = nli_triplets_of_files([read_nli(path).pairs for path in nli_files], seed=42)
    draw.shuffle(triplets)
    nli_batches = [triplets[i:i + 64] for i in range(0, 4 * 64, 64)]

    def sts_terms(embed, batch) -> tuple[list[float], list[float]]:
        columns = embed([[p.sentence1 for p in batch], [p.sentence2 for p in batch]])
        cosine = F.cosine_similarity(columns[0], columns[1])
        labels = torch.tensor([p.label for p in batch], dtype=torch.float32)
        return ((cosine - labels) ** 2).tolist(), cosine.tolist()

    def nli_term(embed, batch) -> float:
        columns = F.normalize(embed([[t.anchor for t in batch], [t.positive for t in batch],
                                     [t.negative for t in batch]]), dim=-1)
        scores = 20 * columns[0] @ torch.cat([columns[1], columns[2]]).T
        return F.cross_entropy(scores, torch.arange(len(batch))).item()

    def measure(embed) -> tuple[float, float, float]:
        squares, cosines = [], []
        for batch in sts_batches:
            s, c = sts_terms(embed, batch)
            squares += s
            cosines += c
        return statistics.mean(squares), statistics.mean(cosines), statistics.mean(nli_term(embed, b) for b in nli_batches)

    paths = {"kfdeb": kfdeb_embed, "reference": reference_embed}
    with torch.no_grad():
        kfdeb_model.eval()
        reference.eval()
        for name, embed in paths.items():
            sts_mse, cosine, nli = measure(embed)
            print(f"eval  {name:9}: STS squared error {sts_mse:.6f}, mean cos {cosine:.6f}, NLI loss {nli:.6f}")
        kfdeb_model.train()
        reference.train()
        per_draw = {name: [] for name in paths}
        for d in range(args.draws):
            for name, embed in paths.items():
                torch.manual_seed(1000 + d)  # the same seeds for both paths: not the same masks (other shapes)
                per_draw[name].append(measure(embed))
        if args.spread_batches:  # eval mode, kfdeb's path (the two agree there, above)
            kfdeb_model.eval()
            last = min(4 + args.spread_batches, len(triplets) // 64)  # batches the 4 above did not use
            nli = [nli_term(kfdeb_embed, triplets[i:i + 64]) for i in range(4 * 64, last * 64, 64)]
            train_pairs = read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-train.tsv")
            draw.shuffle(train_pairs)  # random batches, as training draws them (the file is grouped by source)
            sts = [statistics.mean(sts_terms(kfdeb_embed, train_pairs[i:i + 8])[0])
                   for i in range(0, len(train_pairs) - 7, 8)]
            print(f"eval, batch to batch: NLI loss {statistics.mean(nli):.4f} sd {statistics.stdev(nli):.4f} over "
                  f"{len(nli)} batches of 64; STS squared error {statistics.mean(sts):.4f} sd {statistics.stdev(sts):.4f} "
                  f"over {len(sts)} batches of 8")
    for name, values in per_draw.items():
        if not values:  # --draws 0: the eval-mode figures only
            continue
        cells = []
        for what, column in zip(("STS squared error", "mean cos", "NLI loss"), zip(*values)):
            se = statistics.stdev(column) / math.sqrt(len(column)) if len(column) > 1 else float("nan")
            cells.append(f"{what} {statistics.mean(column):.5f} (se {se:.5f})")
        print(f"train {name:9}: " + ", ".join(cells) + f" over {args.draws} draws")


if __name__ == "__main__":
    main()
