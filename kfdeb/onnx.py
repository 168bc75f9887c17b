"""The whole sentence encoder as one ONNX graph: export, verification, int8/fp16 variants, and a runner.

The graph is `SentenceEncoder.forward` itself, traced by torch's TorchScript-based exporter
(`torch.onnx.export(..., dynamo=False)`; the dynamo exporter needs onnxscript):

    inputs   input_ids (B x L, int64), attention_mask (B x L, int64; 1 = token, 0 = padding),
             token_type_ids (B x L, int64) for models with segment embeddings (type_vocab_size > 1:
             BERT), as Hugging Face's ONNX exports take them; none for DeBERTa-v2 (type_vocab_size
             0) or RoBERTa/XLM-R (1), whose exports take ids and mask only
    outputs  last_hidden_state  h = the encoder's last hidden states           (B x L x H, float32)
             sentence_embedding e_b = sum_l m_bl h_bl / max(sum_l m_bl, 1e-9)  (B x H, float32),
                                then e_b / ||e_b|| if the model ends in a Normalize module
B and L are dynamic. The names are the Hugging Face export conventions that the runtimes users
serve with read: sentence-transformers' `backend="onnx"` (optimum's feature-extraction model)
takes `last_hidden_state` and pools it itself, transformers.js too, and a runtime feeds only the
inputs the graph declares. A single sentence is segment 0, so kfdeb feeds zeros as token_type_ids
and PyTorch's default is the same. Pooling stays in one place: the exporter inlines our
MaskedMeanPool autograd.Function into its bmm (MatMul) and division, and last_hidden_state is
the same hidden states, caught on their way into the pooling by a forward hook. DeBERTa-v2's
windowed attention bias (deberta.py) steps aside while tracing (its window would freeze to the
example's length), so the graph holds transformers' full-table bias: the same sums, which the
check below compares with the windowed PyTorch path.

Files (beside the .onnx; written to a scratch folder, checked, then renamed into place with the
.onnx files last, so a failed export leaves nothing and a reader never sees a half-written graph):
    model.onnx          fp32 graph; onnx.checker-valid; compared with PyTorch on onnxruntime
    model.int8.onnx     --quantize int8: onnxruntime quantize_dynamic with Int8Settings (below):
                        weights u8 with one scale per output column, activations u8 quantized per
                        batch at run time, the embedding tables and layer 0's FFN output projection
                        kept fp32. Measured on all-MiniLM-L6-v2, 2514 KorSTS test sentences, on an
                        AVX2 CPU without VNNI (bench/ONNX_RESULTS.md): mean / min cosine to fp32
                        0.9905 / 0.9732; onnxruntime's plain settings (per-tensor s8) give 0.88 / 0.75
    model.fp16.onnx     --fp16: fp16 weights and arithmetic, float32 inputs/outputs kept
    tokenizer.json ...  tokenizer.save_pretrained, for any runtime
    kfdeb_onnx.json     max_seq_length, do_lower_case, normalize, pad id: how OnnxEncoder tokenizes
An earlier export's model.int8.onnx / model.fp16.onnx that this run does not rewrite is deleted:
it would no longer match the model.onnx and tokenizer beside it.

Verification runs the new graph on batches whose sizes (1, 3, 5) and lengths (up to
max_seq_length, padded rows included) differ from the export example (2 sentences), and compares
the embeddings (token states at real tokens only) with PyTorch: fp32 must agree to 1e-4 (seen:
~1e-6). fp16 must agree to FP16_RELATIVE_TOLERANCE x the largest |value| of that output: fp16
keeps 11 significant bits (a rounding is up to 2^-11 ~ 4.9e-4 relative), and a few dozen
roundings compound through the layers, so 1e-2 relative passes a sound conversion while a broken
one (overflow, a dropped cast: errors of order 1) still fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kfdeb.batching import pad_batch
from kfdeb.errors import UserInputError, first_line
from kfdeb.files import publish_files
# the int8/fp16 variants (onnx_quantize.py), also reached through this module (export.py, tests, bench)
from kfdeb.onnx_quantize import (  # noqa: F401
    ConstMatMul, Int8Settings, convert_fp16, cpu_has_vnni, quantizable_matmuls, quantize_int8, require,
)
from kfdeb.model import SentenceEncoder, position_limit
# the graph's interface and its runner (onnx_runtime.py), also reached through this module
from kfdeb.onnx_runtime import (  # noqa: F401
    INPUT_NAMES, METADATA_FILE, OUTPUT_NAMES, TOKEN_TYPES, OnnxEncoder, feed, open_session,
)

# 14: the lowest opset whose DeBERTa-v2 graph onnxruntime accepts and that we test; 20: the
# TorchScript exporter's highest own opset (above it torch converts with onnx's version converter).
SUPPORTED_OPSETS = range(14, 21)
DEFAULT_OPSET = 17
VARIANTS = {"fp16", "int8"}  # written beside model.onnx as model.<variant>.onnx
FP32_TOLERANCE = 1e-4
FP16_RELATIVE_TOLERANCE = 1e-2

_EXAMPLE = ["한국어 문장 인코더를 하나의 그래프로 내보낸다.", "예시 문장"]
_CHECK_BATCHES = [
    ["고양이"],
    ["한 남자가 큰 플루트를 연주하고 있다.", "비행기가 이륙하고 있다.", ""],
    ["남자가 피자에 치즈를 뿌리고 있다. " * 200,  # truncated to max_seq_length
     "A man is playing a flute.", "세 명의 아이들이 공원에서 축구를 하고 있다.", "!", "오늘 날씨가 맑다"],
]


def sibling(path: str | os.PathLike, variant: str) -> Path:
    """model.onnx -> model.int8.onnx / model.fp16.onnx (same folder, same tokenizer)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{variant}.onnx")


def check_arguments(output: str | os.PathLike, opset: int, quantize: str | None = None) -> None:
    """The export's flags, checked before any model is loaded."""
    if Path(output).suffix != ".onnx":
        raise UserInputError(f"--output {output}: the file name must end in .onnx (kfdeb.load and evaluate.py look for it)")
    if opset not in SUPPORTED_OPSETS:
        raise UserInputError(
            f"--opset {opset}: not supported (use {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}; "
            f"default {DEFAULT_OPSET})"
        )
    if quantize not in (None, "int8"):
        raise UserInputError(f"--quantize {quantize}: only int8 is supported")


def input_names(encoder: SentenceEncoder) -> tuple[str, ...]:
    """The graph's inputs: ids and mask, and token_type_ids where the model has segment embeddings."""
    return INPUT_NAMES + ((TOKEN_TYPES,) if getattr(encoder.transformer.config, "type_vocab_size", 0) > 1 else ())


class _ExportGraph(torch.nn.Module):
    """SentenceEncoder.forward unchanged, also returning the token states it pooled."""

    def __init__(self, encoder: SentenceEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        caught: list[torch.Tensor] = []
        hook = self.encoder.transformer.register_forward_hook(lambda _m, _a, out: caught.append(out[0]))
        try:
            sentence = self.encoder(input_ids, attention_mask, token_type_ids)
        finally:
            hook.remove()
        return sentence, caught[0]


@contextlib.contextmanager
def _plain_python_functions(transformer: torch.nn.Module) -> Iterator[None]:
    """The model module's TorchScript-compiled helpers replaced by their Python originals, for tracing.

    transformers 4.x compiles DeBERTa-v2's position helpers with @torch.jit.script (5.x does not);
    traced, their `if` branches become ONNX If nodes whose subgraphs read values the exporter
    places after them, which onnx.checker rejects ("Nodes in a graph must be topologically
    sorted"). torch keeps each compiled function's source function (`_torchdynamo_inline`), and
    the functions are looked up by name at call time, so swapping the module's globals suffices.
    """
    module = sys.modules[type(transformer).__module__]
    compiled = {name: value for name, value in vars(module).items()
                if isinstance(value, torch.jit.ScriptFunction) and hasattr(value, "_torchdynamo_inline")}
    for name, value in compiled.items():
        setattr(module, name, value._torchdynamo_inline)
    try:
        yield
    finally:
        for name, value in compiled.items():
            setattr(module, name, value)


def _torch_export(encoder: SentenceEncoder, path: Path, opset: int) -> None:
    names = input_names(encoder)
    input_ids, attention_mask = pad_batch(encoder.tokenize(_EXAMPLE), encoder.pad_id)
    example = tuple(torch.from_numpy(value) for value in feed(names, input_ids, attention_mask).values())
    dynamic = {**{name: {0: "batch", 1: "sequence"} for name in names},
               "sentence_embedding": {0: "batch"}, "last_hidden_state": {0: "batch", 1: "sequence"}}
    was_training, device = encoder.training, encoder.device
    encoder.eval().cpu()  # traced on the CPU so the graph holds no device-specific constants
    try:
        with warnings.catch_warnings(), torch.no_grad(), _plain_python_functions(encoder.transformer):
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape arithmetic, verified below
            torch.onnx.export(
                _ExportGraph(encoder), example, str(path), dynamo=False,
                opset_version=opset, input_names=list(names), output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic, do_constant_folding=True,
            )
    except Exception as err:  # an architecture or op the exporter cannot express
        raise UserInputError(
            f"{type(encoder.transformer).__name__}: ONNX export failed at opset {opset} ({first_line(err)})"
        ) from None
    finally:
        encoder.train(was_training).to(device)
    require("onnx").checker.check_model(str(path))


def verify(path: str | os.PathLike, encoder: SentenceEncoder, relative: bool = False,
           tolerance: float = FP32_TOLERANCE) -> dict[str, float]:
    """Max |ONNX - PyTorch| per output on the check batches; UserInputError above the tolerance.

    relative: the tolerance is a fraction of the output's largest |value| (used for fp16).
    """
    session = open_session(path)
    worst = {name: 0.0 for name in OUTPUT_NAMES}
    scale = {name: 0.0 for name in OUTPUT_NAMES}
    for sentences in _CHECK_BATCHES:
        input_ids, attention_mask = pad_batch(encoder.tokenize(sentences), encoder.pad_id)
        reference = _pytorch_outputs(encoder, input_ids, attention_mask)
        try:
            got = session.run(list(OUTPUT_NAMES), feed([i.name for i in session.get_inputs()], input_ids, attention_mask))
        except Exception as err:  # e.g. a shape the tracer froze to the example's
            raise UserInputError(
                f"{Path(path).name}: onnxruntime fails on a batch of {input_ids.shape[0]} x {input_ids.shape[1]} "
                f"tokens ({first_line(err)}); nothing was written"
            ) from None
        real = attention_mask.numpy()[..., None].astype(bool)  # padding positions hold no defined value
        for name, expected, actual in zip(OUTPUT_NAMES, reference, got):
            if name == "last_hidden_state":
                expected, actual = np.where(real, expected, 0), np.where(real, actual, 0)
            worst[name] = max(worst[name], float(np.abs(actual - expected).max()))
            scale[name] = max(scale[name], float(np.abs(expected).max()))
    for name in OUTPUT_NAMES:
        allowed = tolerance * max(scale[name], 1.0) if relative else tolerance
        if not worst[name] <= allowed:  # also catches nan
            raise UserInputError(
                f"{Path(path).name}: {name} differs from PyTorch by up to {worst[name]:.3g} on onnxruntime "
                f"(tolerance {allowed:.3g}); nothing was written (--no_check skips this check)"
            )
    return worst


def _pytorch_outputs(encoder: SentenceEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[np.ndarray]:
    """What the graph computes, from the PyTorch module it was traced from (eval mode, no dropout)."""
    was_training = encoder.training
    try:
        with torch.inference_mode():
            outputs = _ExportGraph(encoder).eval()(input_ids.to(encoder.device), attention_mask.to(encoder.device))
    finally:
        encoder.train(was_training)
    return [t.float().cpu().numpy() for t in outputs]


def _runtime_metadata(encoder: SentenceEncoder, opset: int) -> dict[str, Any]:
    config = encoder.transformer.config
    # the longest input the graph can take: absolute position embeddings end, relative attention does not
    limit = position_limit(encoder.transformer) if getattr(config, "position_biased_input", True) else None
    return {
        "format": "kfdeb-onnx/1",
        "max_seq_length": encoder.max_seq_length,
        "length_limit": limit,
        "do_lower_case": encoder.do_lower_case,
        "normalize": encoder.normalize,
        "pooling": encoder.pooling,
        "prompts": encoder.prompts,
        "default_prompt_name": encoder.default_prompt_name,
        "pad_token_id": encoder.pad_id,
        "dimension": encoder.dimension,
        "model_type": getattr(config, "model_type", None),
        "opset": opset,
        "inputs": list(input_names(encoder)),
        "outputs": list(OUTPUT_NAMES),
    }


@dataclass
class ExportResult:
    paths: dict[str, Path]  # "fp32" / "fp16" / "int8" -> written graph
    max_abs_diff: dict[str, dict[str, float]]  # variant -> output -> max |ONNX - PyTorch| (checked ones)


def export(encoder: SentenceEncoder, output: str | os.PathLike, opset: int = DEFAULT_OPSET, check: bool = True,
           quantize: str | None = None, fp16: bool = False, int8: Int8Settings | None = None) -> ExportResult:
    """Write `output` (fp32), its tokenizer and kfdeb_onnx.json, and the chosen variants beside it."""
    output = Path(output)
    check_arguments(output, opset, quantize)
    require("onnx")
    require("onnxruntime")
    folder_existed = output.parent.exists()
    output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".kfdeb-onnx-", dir=output.parent))
    try:
        encoder.tokenizer.save_pretrained(scratch)
        (scratch / METADATA_FILE).write_text(json.dumps(_runtime_metadata(encoder, opset), indent=2) + "\n")
        staged = {"fp32": scratch / output.name}
        diffs = {}
        _torch_export(encoder, staged["fp32"], opset)
        if check:
            diffs["fp32"] = verify(staged["fp32"], encoder)
        if fp16:
            staged["fp16"] = scratch / sibling(output, "fp16").name
            convert_fp16(staged["fp32"], staged["fp16"])
            if check:
                diffs["fp16"] = verify(staged["fp16"], encoder, relative=True, tolerance=FP16_RELATIVE_TOLERANCE)
        if quantize:
            staged["int8"] = scratch / sibling(output, "int8").name
            # the default keep_fp32 names BERT-style layers: on a model named otherwise it only warns
            settings = int8 or Int8Settings()
            quantize_int8(staged["fp32"], staged["int8"], settings,
                          strict=settings.keep_fp32 != Int8Settings().keep_fp32)
        # tokenizer and metadata first, graphs last: whoever sees a new .onnx also sees how to feed it
        publish_files(scratch, output.parent, order=lambda p: p.suffix == ".onnx")
        for variant in VARIANTS.difference(staged):  # an older export's: it no longer matches model.onnx
            sibling(output, variant).unlink(missing_ok=True)
    except BaseException:
        if not folder_existed:
            shutil.rmtree(output.parent, ignore_errors=True)  # we made it; nothing of ours is finished
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult({k: output.parent / v.name for k, v in staged.items()}, diffs)


@dataclass
class EngineRow:
    name: str
    file_bytes: int | None
    sentences_per_second: float
    cosine_mean: float  # per-sentence cosine to the PyTorch fp32 embeddings
    cosine_min: float


def compare(encoder: SentenceEncoder, graphs: dict[str, Path], sentences: Sequence[str],
            batch_size: int = 32) -> list[EngineRow]:
    """Speed and agreement of PyTorch fp32 and each graph on the same sentences (CPU, in turn)."""
    engines: list[tuple[str, Any, int | None]] = [("PyTorch fp32", encoder, None)]
    engines += [(f"ONNX {variant}", OnnxEncoder.load(path, encoder.max_seq_length), path.stat().st_size)
                for variant, path in graphs.items()]
    rows, reference = [], None
    for name, engine, size in engines:
        engine.encode(sentences[:batch_size], batch_size=batch_size)  # warm-up: allocations, lazy init
        start = time.perf_counter()
        vectors = engine.encode(sentences, batch_size=batch_size)
        seconds = time.perf_counter() - start
        reference = vectors if reference is None else reference
        cosine = F.cosine_similarity(vectors, reference, dim=-1)
        rows.append(EngineRow(name, size, len(sentences) / seconds, float(cosine.mean()), float(cosine.min())))
    return rows
