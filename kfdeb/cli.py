"""What the top-level scripts share: quiet third-party logs, one-line errors, exit statuses.

exit 0: done; 1: training stopped on a non-finite loss; 2: a user mistake (bad file, flag,
model folder), reported as `error: <file:line: field: problem>` without a traceback; 143: training
stopped by SIGTERM after saving its state (the line says how to continue with --resume).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

from kfdeb.errors import TrainingStopped, UserInputError
from kfdeb.flags import FlagParser, add_progress_flag, progress_shown


def quiet_third_party() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we tokenize before any worker forks
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def execute(main: Callable[[], int | None]) -> None:
    """Call `main`, turning user mistakes into one line on stderr and exit status 2."""
    try:
        status = main()
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        status = 2
    except TrainingStopped as err:  # SIGTERM: every rank stopped at the same step, rank 0 saved the state
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        status = 143  # 128 + SIGTERM, what a process ended by SIGTERM reports
    except FloatingPointError as err:  # every rank stops at the same step with the same message
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    exit_process(status or 0)


def exit_process(status: int) -> None:
    """End the process with `status`; a torchrun worker ends without tearing the interpreter down.

    Why: torch keeps the process group's worker threads alive after destroy_process_group (DDP
    and the differentiable all_gather hold references to it). Such a thread drops its last
    reference to a finished collective a moment after the collective returns; when that moment
    falls inside the interpreter's teardown and the collective held a tensor with a Python
    object (all_gather_object's, the loss's), the thread must take the GIL of a finalizing
    interpreter, is made to exit, and unwinding through a C++ destructor calls std::terminate:
    SIGABRT, "terminate called without an active exception", after a run that succeeded. Its
    torchrun agent then reports a failure and skips the exit barrier, so the other nodes' agents
    wait there 300 s. Seen in 3 of 50 runs of tests/test_distributed.py on 2 busy cores (the
    core's stacks: gloo's runLoop in ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref ->
    take_gil -> pthread_exit, the main thread in Py_FinalizeEx). Every collective has finished
    when a worker gets here (train ends in a barrier, errors are agreed by all ranks), so the
    process flushes its output and leaves at once, with nothing left to tear down.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def train_main(argv: list[str] | None = None) -> int:
    from kfdeb.config import parse_args

    config = parse_args(argv)
    quiet_third_party()
    from kfdeb.loop import train

    train(config)
    return 0


DTYPE_HELP = ("what the encoder computes in: float32, bfloat16, float16 (autocast: the products in that dtype; pooling, "
              "normalisation, similarity and search stay float32), or auto (bfloat16 on a GPU with native bf16 or a "
              "CPU with amx_bf16/avx512_bf16, else float32). An ONNX model: float32 or auto")


def add_dtype_argument(parser: Any) -> None:
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help=DTYPE_HELP + " (default: float32)")


def dtype_line(encoder: Any) -> str:
    """The line the scripts print: which dtype the encode used, and why."""
    from kfdeb.inference_dtype import describe_dtype

    return f"dtype: {describe_dtype(encoder.inference_dtype, encoder.dtype_reason, '--dtype')}"


def evaluate_main(argv: list[str] | None = None) -> int:
    import json
    from pathlib import Path

    import kfdeb
    from kfdeb.config_checks import positive_numbers
    from kfdeb.evaluation import TABLE_HEADER, evaluate_sts, sts_set_line, table_row
    from kfdeb.ir_data import read_ir_data
    from kfdeb.readers import BUNDLED_DATA_DIR, read_scored_file, read_sts, sts_path
    from kfdeb.retrieval import TABLE_HEADER as IR_TABLE_HEADER
    from kfdeb.retrieval import evaluate_retrieval, ir_set_line, ir_table_row

    parser = FlagParser(
        prog="evaluate.py",
        description="KorSTS figures (Pearson/Spearman x100 of cosine, euclidean, manhattan, dot) of a model, "
                    "the same figures on your own scored pairs (--data_file), or retrieval figures (nDCG@10, MRR@10, "
                    "MAP@100, Recall@1/5/10/100, x100) on a BEIR folder or a file of relevant pairs (--ir_data).",
    )
    parser.add_argument("ckpt", help="kfdeb output dir, Hugging Face or sentence-transformers folder, or model.onnx")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data_dir", default=None, help="folder with KorSTS/sts-{dev,test}.tsv (default: bundled)")
    data.add_argument("--data_file", default=None, metavar="FILE",
                      help="your own scored pairs instead of KorSTS: .tsv, .csv or .jsonl with sentence1, sentence2, score")
    data.add_argument("--ir_data", default=None, metavar="DIR|FILE",
                      help="retrieval instead of KorSTS: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) "
                           "or a .tsv/.csv/.jsonl file of anchor, positive (or query, document) pairs")
    parser.add_argument("--split", default=None,
                        help="KorSTS split (test or dev), or with --ir_data the qrels split (default: test)")
    parser.add_argument("--score_max", type=float, default=None,
                        help="--data_file's highest score: scores must lie in 0..score_max (default: 5)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: the model's own (256 if unset)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--name", default=None, help="row label (default: the checkpoint's name)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures (x100, unrounded) here "
                        "(with --dims: an object of them per width)")
    parser.add_argument("--dims", default=None, metavar="D1,D2,...",
                        help="Matryoshka: one row per width, the embeddings truncated to their first D coordinates "
                             "(as sentence-transformers' truncate_dim), e.g. 768,256,64")
    add_progress_flag(parser)
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    dims: list[int] = positive_numbers("dims", args.dims or "")
    if args.dims is not None and not dims:
        parser.error(f"--dims {args.dims!r}: expected positive widths")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.data_file is None and args.score_max is not None:
        parser.error("--score_max applies to --data_file only (KorSTS scores are 0..5)")
    if args.data_file is not None and args.split is not None:
        parser.error("--split chooses a KorSTS file under --data_dir; --data_file is evaluated as a whole")
    if args.ir_data is None and args.split not in (None, "test", "dev"):
        parser.error(f"--split {args.split!r}: KorSTS has test and dev")
    if args.score_max is not None and not 0 < args.score_max < float("inf"):
        parser.error("--score_max must be a positive number")
    import torch

    quiet_third_party()
    # a bad file fails before the model loads
    if args.ir_data is not None:
        ir_data = read_ir_data(args.ir_data, args.split or "test")
        split = ir_data.name
    elif args.data_file is not None:
        pairs, split = read_scored_file(args.data_file, "--data_file", args.score_max or 5.0), Path(args.data_file).name
    else:
        split = args.split or "test"
        pairs = read_sts(sts_path(args.data_dir or BUNDLED_DATA_DIR, split))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = kfdeb.load(args.ckpt, device=device, max_seq_length=args.max_seq_length, dtype=args.dtype)
    progress = progress_shown(args.progress)
    # stderr, with the bars: stdout is the table
    sts_name = split if args.data_file is not None else f"KorSTS {split}"
    print(f"evaluating {ir_set_line(ir_data) if args.ir_data is not None else sts_set_line(sts_name, pairs)}",
          file=sys.stderr)
    if args.ir_data is not None:
        result = evaluate_retrieval(encoder, ir_data, args.batch_size, dims, show_progress=progress)
        header, row = IR_TABLE_HEADER, ir_table_row
        speed = (f"{result.queries} queries over {result.documents} documents ({result.texts_encoded} distinct texts "
                 f"encoded) in {result.seconds:.2f} s")
    else:
        result, header, row = evaluate_sts(encoder, pairs, args.batch_size, dims, progress), TABLE_HEADER, table_row
        speed = f"encoded {result.sentences} sentences in {result.seconds:.2f} s: {result.sentences_per_second:.1f} sentences/s"
    ckpt = Path(args.ckpt)
    name = args.name or (f"{ckpt.parent.name}/{ckpt.name}" if ckpt.suffix == ".onnx" else ckpt.resolve().name)
    print(header)
    if dims:
        for dim in dims:
            print(row(f"{name} ({split}, {dim} dims)", result.by_dim[dim]))
    else:
        print(row(f"{name} ({split})", result.figures))
    print(f"{speed} on {getattr(encoder, 'device_name', device)}")
    print(dtype_line(encoder))
    if args.json:
        figures = {str(dim): result.by_dim[dim] for dim in dims} if dims else result.figures
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


def mine_main(argv: list[str] | None = None) -> int:
    import time
    from pathlib import Path

    import kfdeb
    from kfdeb.ir_data import read_texts
    from kfdeb.mining import MiningSettings, mine_hard_negatives, summary, write_rows
    from kfdeb.readers import RELEVANT_PAIR_KINDS, read_own_file

    parser = FlagParser(
        prog="mine.py",
        description="Hard negatives for (anchor, positive) pairs, as sentence-transformers' mine_hard_negatives "
                    "finds them (same options): exact search of a corpus by the model's cosine similarity, the "
                    "anchor's own positives excluded, filters, then the top (or random) candidates. The output is "
                    "ready for train.py --nli_train_files.")
    parser.add_argument("model", help="kfdeb output dir, Hugging Face or sentence-transformers folder, hub id, or model.onnx")
    parser.add_argument("--pairs", required=True, metavar="FILE",
                        help=".tsv/.csv/.jsonl of anchor, positive (or query, document) pairs")
    parser.add_argument("--corpus", default=None, metavar="FILE",
                        help="texts to take negatives from: .txt (one a line), .jsonl (text[, title]), .tsv/.csv "
                             "(a text column); the positives are always added (default: the distinct positives)")
    parser.add_argument("--output", required=True, metavar="FILE", help="where the rows go: .jsonl, .csv or .tsv")
    defaults = MiningSettings()
    parser.add_argument("--range_min", type=int, default=defaults.range_min, help="skip this many top candidates")
    parser.add_argument("--range_max", type=int, default=None,
                        help="consider the top range_max candidates (default: range_min + num_negatives + the most "
                             "positives an anchor has; x10 num_negatives with a margin or max_score)")
    parser.add_argument("--max_score", type=float, default=None, help="drop candidates scored above this")
    parser.add_argument("--min_score", type=float, default=None, help="drop candidates scored below this")
    parser.add_argument("--absolute_margin", type=float, default=None,
                        help="drop a candidate whose score + margin exceeds the anchor's lowest positive score")
    parser.add_argument("--relative_margin", type=float, default=None,
                        help="drop a candidate scored above positive - |positive| x margin (e.g. 0.05)")
    parser.add_argument("--num_negatives", type=int, default=defaults.num_negatives)
    parser.add_argument("--sampling_strategy", default=defaults.sampling_strategy, help="top or random")
    parser.add_argument("--output_format", default=defaults.output_format,
                        help="triplet (anchor, positive, negative: a row per negative) or n-tuple (anchor, positive, "
                             "negative_1 .. negative_n; a row lacking n negatives is dropped)")
    parser.add_argument("--query_prompt", default=None, help="prepended to the anchors (default: the model's query prompt)")
    parser.add_argument("--corpus_prompt", default=None,
                        help="prepended to the corpus texts (default: the model's document prompt)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds the random sampling strategy")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_progress_flag(parser)
    add_dtype_argument(parser)
    args = parser.parse_args(argv)
    settings = MiningSettings(args.range_min, args.range_max, args.max_score, args.min_score, args.absolute_margin,
                              args.relative_margin, args.num_negatives, args.sampling_strategy, args.output_format,
                              args.seed)
    settings.check()
    quiet_third_party()
    # bad files and options fail before the model loads
    pairs = [(row[0], row[1]) for row in read_own_file(args.pairs, RELEVANT_PAIR_KINDS, "--pairs").rows]
    corpus = read_texts(Path(args.corpus)) if args.corpus else None
    output = Path(args.output)
    if output.suffix.lower() not in (".jsonl", ".csv", ".tsv"):
        raise UserInputError(f"{output}: --output: unknown format {output.suffix or '(no extension)'!r} "
                             "(expected .jsonl, .csv, .tsv)")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = kfdeb.load(args.model, device=device, dtype=args.dtype)
    query_prompt = encoder.role_prompt("query") if args.query_prompt is None else args.query_prompt
    corpus_prompt = encoder.role_prompt("document") if args.corpus_prompt is None else args.corpus_prompt
    started = time.perf_counter()
    mined = mine_hard_negatives(encoder, pairs, corpus, settings, query_prompt, corpus_prompt, args.batch_size,
                                show_progress=progress_shown(args.progress))
    seconds = time.perf_counter() - started
    write_rows(output, mined.columns, mined.rows)
    print(summary(mined, settings))
    print(f"{len(pairs):,} pairs, {mined.queries:,} distinct anchors, a corpus of {mined.corpus:,} texts: "
          f"wrote {len(mined.rows):,} {settings.output_format} rows to {output} in {seconds:.1f} s")
    print(dtype_line(encoder))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from kfdeb.onnx import DEFAULT_OPSET, FP16_RELATIVE_TOLERANCE, FP32_TOLERANCE, METADATA_FILE

    parser = FlagParser(
        prog="export.py",
        description="Export a sentence encoder (encoder + its pooling, mean or CLS [+ normalize]) as one ONNX graph with "
                    "inputs input_ids, attention_mask (and token_type_ids for models with segments) and outputs "
                    "sentence_embedding, last_hidden_state (the names sentence-transformers' ONNX backend and "
                    "transformers.js read); "
                    "check it against PyTorch on onnxruntime.",
    )
    parser.add_argument("ckpt", help="kfdeb output dir, Hugging Face or sentence-transformers folder")
    parser.add_argument("--output", default=None, metavar="PATH",
                        help="the .onnx to write (default: MODEL/onnx/model.onnx, MODEL = CKPT or a run's CKPT/best)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 14 to 20 (default {DEFAULT_OPSET})")
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="also write MODEL.int8.onnx (dynamic int8) and compare size, agreement and speed")
    parser.add_argument("--int8_weights", default=None, choices=["u8", "s8"],
                        help="int8 weight type: u8 (default; exact on every x86 CPU) or s8 (faster on CPUs with VNNI, "
                             "avx512_vnni or avx_vnni in /proc/cpuinfo; saturates on AVX2 without VNNI)")
    parser.add_argument("--fp16", action="store_true", help="also write MODEL.fp16.onnx (fp16 inside, float32 in/out)")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="truncation length recorded for the ONNX encoder (default: the model's own)")
    parser.add_argument("--no_check", dest="check", action="store_false",
                        help="skip the onnxruntime-vs-PyTorch comparison (on by default)")
    args = parser.parse_args(argv)
    quiet_third_party()
    import kfdeb.onnx as kfdeb_onnx
    from kfdeb.readers import BUNDLED_DATA_DIR, read_sts
    from kfdeb.evaluation import distinct_sentences
    from kfdeb.model import load_encoder
    from kfdeb.weights import resolve_model_dir

    if args.output is None and not Path(args.ckpt).is_dir():
        resolve_model_dir(args.ckpt)  # a missing folder or a file: its own message
        raise UserInputError(f"{args.ckpt}: not a local folder, so there is no default output; pass --output PATH.onnx")
    # inside the model folder (a run's best/), where sentence-transformers' ONNX backend looks for it
    output = Path(args.output) if args.output else resolve_model_dir(args.ckpt) / "onnx" / "model.onnx"
    # bad flags and a missing [onnx] extra fail before the model loads
    kfdeb_onnx.check_arguments(output, args.opset, args.quantize)
    if args.int8_weights and not args.quantize:
        raise UserInputError(f"--int8_weights {args.int8_weights}: only with --quantize int8")
    int8 = kfdeb_onnx.Int8Settings(weight_type=(args.int8_weights or "u8").upper())
    if args.quantize and int8.weight_type == "S8" and kfdeb_onnx.cpu_has_vnni() is False:
        print("note: this CPU has no VNNI, so onnxruntime multiplies u8 x s8 with VPMADDUBSW, whose int16 sums "
              "saturate: the int8 agreement printed below is this CPU's; a VNNI CPU computes the same graph exactly")
    kfdeb_onnx.require("onnx")
    kfdeb_onnx.require("onnxruntime")
    encoder = load_encoder(args.ckpt, max_seq_length=args.max_seq_length, device="cpu")
    result = kfdeb_onnx.export(encoder, output, args.opset, args.check, args.quantize, args.fp16, int8)
    for variant, diffs in result.max_abs_diff.items():
        limit = f"{FP32_TOLERANCE:g}" if variant == "fp32" else f"{FP16_RELATIVE_TOLERANCE:g} x max |value|"
        print(f"check {variant}: max abs diff to PyTorch on onnxruntime (batches of 1, 3, 5 sentences, padded): "
              + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()) + f" (tolerance {limit}): ok")
    if not args.check:
        print("check skipped (--no_check)")
    for variant, path in result.paths.items():
        what = (f"opset {args.opset}; inputs {', '.join(kfdeb_onnx.input_names(encoder))}; "
                f"outputs {', '.join(kfdeb_onnx.OUTPUT_NAMES)}")
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB" + (f", {what})" if variant == "fp32" else ")"))
    print(f"wrote the tokenizer and {METADATA_FILE} beside it")
    if args.quantize or args.fp16:
        pairs = read_sts(BUNDLED_DATA_DIR / "KorSTS" / "sts-dev.tsv")
        sentences = distinct_sentences(pairs)[:512]
        rows = kfdeb_onnx.compare(encoder, result.paths, sentences)
        print(f"| engine ({len(sentences)} KorSTS dev sentences, batch 32, CPU) | file MB | cosine to PyTorch fp32 "
              "(mean / min) | sentences/s |\n|---|---|---|---|")
        for row in rows:
            size = f"{row.file_bytes / 1e6:.1f}" if row.file_bytes is not None else "-"
            print(f"| {row.name} | {size} | {row.cosine_mean:.5f} / {row.cosine_min:.5f} "
                  f"| {row.sentences_per_second:.1f} |")
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    """merge.py: the fine-tuned model mixed with its start, chosen on dev sets (kfdeb/merge.py)."""
    quiet_third_party()
    from kfdeb import merge

    return merge.main(argv)


def train_entry() -> None:
    """`kfdeb-train`: the console script installed with the package."""
    execute(train_main)


def evaluate_entry() -> None:
    """`kfdeb-evaluate`."""
    execute(evaluate_main)


def export_entry() -> None:
    """`kfdeb-export`."""
    execute(export_main)


def mine_entry() -> None:
    """`kfdeb-mine`."""
    execute(mine_main)


def merge_entry() -> None:
    """`kfdeb-merge`."""
    execute(merge_main)
