"""A synthetic KorNLI training set of the real size and format, for startup benchmarks.

    python bench/synthetic_kornli.py DATA_DIR [--scale 1.0] [--seed 0]

writes DATA_DIR/KorNLI/multinli.train.ko.tsv (392,702 pairs) and snli_1.0_train.ko.tsv (550,152
pairs), tab-separated with the header `sentence1<TAB>sentence2<TAB>gold_label` and LF line ends
as in kakaobrain/kor-nlu-datasets, and copies the bundled KorSTS files to DATA_DIR/KorSTS, so
`train.py --data_dir DATA_DIR` reads it like a kor-nlu-datasets clone. The KorNLI training files
are not bundled (too large) and the benchmarks must run offline, hence this stand-in.

Sentences are words of the bundled XNLI files drawn at random: premises of 8-22 words, hypotheses
of 4-12 words; each premise comes with one hypothesis per label (entailment, neutral,
contradiction), so every premise yields two triplets. 392,702 is not a multiple of 3: the last
multinli premise gets an entailment and a neutral hypothesis only (no triplet). The recipe then
builds 628,568 triplets from 942,854 pairs, as from the real files. Deterministic: the same seed
and scale give the same bytes. --scale shrinks both files (a quick check of the pipeline).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from kfdeb.readers import BUNDLED_DATA_DIR, NLI_LABELS, read_nli  # noqa: E402

FILES = {"multinli.train.ko.tsv": 392_702, "snli_1.0_train.ko.tsv": 550_152}  # pairs, as in kor-nlu-datasets
PREMISE_WORDS, HYPOTHESIS_WORDS = (8, 22), (4, 12)  # inclusive ranges


def xnli_vocabulary() -> list[str]:
    """The distinct words of the bundled XNLI dev/test sentences, in order of first appearance."""
    words: dict[str, None] = {}
    for path in sorted((BUNDLED_DATA_DIR / "KorNLI").glob("xnli.*.ko.tsv")):
        for first, second, _ in read_nli(path).pairs:
            words.update(dict.fromkeys(first.split() + second.split()))
    return list(words)


def sentences(rng: np.random.Generator, vocabulary: np.ndarray, count: int, words: tuple[int, int]) -> list[str]:
    lengths = rng.integers(words[0], words[1] + 1, size=count)
    picks = vocabulary[rng.integers(len(vocabulary), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" ".join(picks[end - length:end]) for end, length in zip(ends.tolist(), lengths.tolist())]


def write_file(path: Path, pairs: int, rng: np.random.Generator, vocabulary: np.ndarray) -> None:
    premises = sentences(rng, vocabulary, -(-pairs // len(NLI_LABELS)), PREMISE_WORDS)
    hypotheses = sentences(rng, vocabulary, pairs, HYPOTHESIS_WORDS)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("sentence1\tsentence2\tgold_label\n")
        for i, hypothesis in enumerate(hypotheses):  # premise i // 3 with its entailment, neutral, contradiction
            handle.write(f"{premises[i // 3]}\t{hypothesis}\t{NLI_LABELS[i % 3]}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vocabulary = np.array(xnli_vocabulary(), dtype=object)
    (args.data_dir / "KorNLI").mkdir(parents=True, exist_ok=True)
    for index, (name, pairs) in enumerate(FILES.items()):
        rng = np.random.default_rng([args.seed, index])  # one stream per file: each file's bytes stand alone
        write_file(args.data_dir / "KorNLI" / name, max(3, round(pairs * args.scale)), rng, vocabulary)
    shutil.copytree(BUNDLED_DATA_DIR / "KorSTS", args.data_dir / "KorSTS", dirs_exist_ok=True)
    print(f"{args.data_dir}: KorNLI/{', KorNLI/'.join(FILES)} ({len(vocabulary)} XNLI words), KorSTS/ (bundled)")


if __name__ == "__main__":
    main()
