"""What the top-level scripts share: quiet third-party logs, one-line errors, exit statuses.

exit 0: done; 1: training stopped on a non-finite loss; 2: a user mistake (bad file, flag,
model folder), reported as `error: <file:line: field: problem>` without a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

from kfdeb.errors import UserInputError


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize before any worker forks
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(main: Callable[[], int | None]) -> None:
    """Call `main`, turning user mistakes into one line on stderr and exit status 2."""
    try:
        status = main()
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)


def train_main(argv: list[str] | None = None) -> int:
    from kfdeb.config import parse_args

    config = parse_args(argv)
    quiet_third_party()
    from kfdeb.loop import train

    train(config)
    return 0


def evaluate_main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    import kfdeb
    from kfdeb.data import BUNDLED_DATA_DIR, read_sts
    from kfdeb.evaluation import TABLE_HEADER, evaluate_sts, sts_path, table_row

    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="KorSTS figures (Pearson/Spearman x100 of cosine, euclidean, manhattan, dot) of a model.",
    )
    parser.add_argument("ckpt", help="kfdeb output dir, Hugging Face or sentence-transformers folder, or model.onnx")
    parser.add_argument("--data_dir", default=str(BUNDLED_DATA_DIR), help="folder with KorSTS/sts-{dev,test}.tsv (default: bundled)")
    parser.add_argument("--split", default="test", choices=["test", "dev"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: the model's own (256 if unset)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--name", default=None, help="row label (default: the checkpoint's name)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the 8 figures (x100, unrounded) here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    import torch

    quiet_third_party()
    pairs = read_sts(sts_path(args.data_dir, args.split))  # a bad file fails before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = kfdeb.load(args.ckpt, device=device, max_seq_length=args.max_seq_length)
    result = evaluate_sts(encoder, pairs, args.batch_size)
    ckpt = Path(args.ckpt)
    name = args.name or (f"{ckpt.parent.name}/{ckpt.name}" if ckpt.suffix == ".onnx" else ckpt.resolve().name)
    print(TABLE_HEADER)
    print(table_row(f"{name} ({args.split})", result.figures))
    print(f"encoded {result.sentences} sentences in {result.seconds:.2f} s: "
          f"{result.sentences_per_second:.1f} sentences/s on {getattr(encoder, 'device_name', device)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.figures, indent=2) + "\n", encoding="utf-8")
    return 0
