"""int8 and fp16 variants of an exported graph: which MatMuls dynamic quantisation rewrites, and how.

`quantize_int8` runs onnxruntime's quantize_dynamic with `Int8Settings` over the MatMuls that
`quantizable_matmuls` finds (their node names carry each weight's layer and role, as the exporter
names them); `convert_fp16` turns the fp32 graph into fp16 arithmetic with float32 inputs and
outputs. onnx.py writes and checks the variants; bench/int8_settings.py compares settings.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kfdeb.errors import UserInputError

INSTALL_HINT = 'pip install ".[onnx]" (onnx and onnxruntime)'


def require(name: str) -> ModuleType:
    """onnx / onnxruntime, imported only when used: they are the optional [onnx] extra."""
    try:
        return __import__(name)
    except ImportError:
        raise UserInputError(f"{name} is not installed; ONNX export and .onnx models need {INSTALL_HINT}") from None


@dataclass(frozen=True)
class Int8Settings:
    """How `--quantize int8` quantises the fp32 graph (onnxruntime quantize_dynamic).

    per_channel   one weight scale per output column of each MatMul (else one per tensor)
    reduce_range  7-bit weights (s8 only: x86 CPUs without VNNI multiply u8 x s8 with VPMADDUBSW,
                  whose int16 sums of two products saturate; 7-bit weights cannot reach that point)
    weight_type   "U8" or "S8" weights; activations are always u8, quantised per batch at run time
    embeddings    quantise the embedding-table Gathers too (else they stay fp32)
    keep_fp32     MatMuls left in fp32: a role in every layer ("output/dense": each FFN output
                  projection), a role in one layer ("layer.0/output/dense") or a node's full name

    The defaults (per-channel u8 weights, embedding tables and layer 0's FFN output projection in
    fp32) were chosen on KorSTS dev sentences with bench/int8_settings.py; the measurements and the
    reasons for each choice are in bench/ONNX_RESULTS.md ("Why the int8 defaults").
    """

    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "U8"
    embeddings: bool = False
    keep_fp32: tuple[str, ...] = ("layer.0/output/dense",)

    def __post_init__(self):
        if self.weight_type not in ("U8", "S8"):
            raise ValueError(f"weight_type {self.weight_type!r}: expected 'U8' or 'S8'")


def cpu_has_vnni(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies u8 x s8 into int32 in one instruction (AVX512-VNNI or AVX-VNNI), read
    from /proc/cpuinfo's flags; None where that file or an x86 flags line is missing (not Linux x86)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags))


@dataclass(frozen=True)
class ConstMatMul:
    name: str  # the graph node, e.g. /encoder/transformer/encoder/layer.0/output/dense/MatMul
    layer: int | None  # transformer layer index, None outside the layers
    role: str  # the module path inside its layer, e.g. output/dense; the full name outside the layers

    def named_by(self, entry: str) -> bool:
        """`entry` is this node's full name, its role (in every layer) or layer.N/role (in layer N only)."""
        return entry in (self.name, self.role) or (self.layer is not None and entry == f"layer.{self.layer}/{self.role}")


_LAYER_ROLE = re.compile(r"layer\.(\d+)/(.+)/MatMul(_\d+)?$")


def quantizable_matmuls(path: str | os.PathLike) -> list[ConstMatMul]:
    """The MatMuls with a constant weight (the ones dynamic quantisation rewrites), in graph order."""
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in constants:
            match = _LAYER_ROLE.search(node.name)
            found.append(ConstMatMul(node.name, int(match.group(1)), match.group(2)) if match
                         else ConstMatMul(node.name, None, node.name))
    return found


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike, settings: Int8Settings = Int8Settings(),
                  strict: bool = True) -> None:
    """Write the int8 graph of `source`. A keep_fp32 entry that names no MatMul is an error, or with
    strict=False (the defaults, on a model whose layers are named otherwise) a printed warning."""
    import logging

    require("onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    matmuls = quantizable_matmuls(source)
    for entry in settings.keep_fp32:
        if not any(m.named_by(entry) for m in matmuls):
            message = f"keep_fp32 {entry!r}: no MatMul of {Path(source).name} has that role or name"
            if strict:
                raise UserInputError(message)
            print(f"warning: {message}; every MatMul is quantised", file=sys.stderr)
    excluded = [m.name for m in matmuls if any(m.named_by(entry) for entry in settings.keep_fp32)]
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # it logs advice on pre-processing (which fails on these graphs) to root
    try:
        quantize_dynamic(str(source), str(target), per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range,
                         weight_type=QuantType.QInt8 if settings.weight_type == "S8" else QuantType.QUInt8,
                         op_types_to_quantize=["MatMul", "Gather"] if settings.embeddings else ["MatMul"],
                         nodes_to_exclude=excluded)
    finally:
        logging.disable(disabled)


def convert_fp16(source: Path, target: Path) -> None:
    onnx = require("onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about constants clamped into the fp16 range
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    onnx.checker.check_model(str(target))
