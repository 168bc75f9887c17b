"""kfdeb's ONNX export of a real model, opened by every client a user serves it with (issues 22, 28).

    python bench/export_clients.py --model e5 --cache /work/bench-cache \
        --st_onnx_python /path/to/st-onnx-venv/bin/python --transformers_js /path/with/node_modules

Copies the model folder, runs `export.py FOLDER --quantize int8` (fp32 graph at FOLDER/onnx/model.onnx,
where sentence-transformers' ONNX backend and transformers.js look), then embeds the first
--sentences distinct KorSTS test sentences (raw, no prompt, batch 32) with:

    kfdeb PyTorch fp32        the reference every other row is compared with
    kfdeb ONNX fp32 / int8    kfdeb.onnx.OnnxEncoder on onnxruntime
    sentence-transformers     SentenceTransformer(FOLDER, backend="onnx") (optimum), in its own venv
                              (it pins transformers 4.x), and SentenceTransformer(FOLDER) in PyTorch there
    transformers.js           pipeline("feature-extraction", FOLDER), mean pooling (+ normalize when the
                              folder ends in Normalize), its own JavaScript tokenizer

and prints, per client, the largest |difference| of any embedding coordinate and the smallest cosine
to kfdeb's PyTorch embedding. transformers.js tokenizes in JavaScript: the sentences its token ids
differ on (from the tokenizers library's, which kfdeb and sentence-transformers use) are printed,
and the row is repeated without them, so a tokenizer difference is not read as a graph difference. The unit tests prove the same on tiny models in CI; this is the real
model's tokenizer (e5: XLM-R's SentencePiece) and real weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import REPO, cpu_model, git_commit, model_path

ST_SCRIPT = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer
folder, sentences, out = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
for backend in ("onnx", "torch"):
    model = SentenceTransformer(folder, backend=backend, device="cpu")
    np.save(out + "." + backend + ".npy", model.encode(sentences, batch_size=32))
import sentence_transformers, transformers, optimum.version, onnxruntime
print("sentence-transformers", sentence_transformers.__version__, "transformers", transformers.__version__,
      "optimum", optimum.version.__version__, "onnxruntime", onnxruntime.__version__)
"""

JS_SCRIPT = """
import { pipeline, env } from '@huggingface/transformers';
import { readFileSync, writeFileSync } from 'fs';
const [root, model, sentencesFile, normalize, out] = process.argv.slice(2);
env.localModelPath = root; env.allowRemoteModels = false;
const extractor = await pipeline('feature-extraction', model, { dtype: 'fp32' });
const sentences = JSON.parse(readFileSync(sentencesFile, 'utf8'));
const rows = [];
for (let i = 0; i < sentences.length; i += 32) {
  const output = await extractor(sentences.slice(i, i + 32), { pooling: 'mean', normalize: normalize === 'true' });
  rows.push(...output.tolist());
}
const tokens = sentences.map(s => Array.from(extractor.tokenizer(s).input_ids.data, Number));
writeFileSync(out, JSON.stringify({ rows, tokens }));
"""


def compare(name: str, theirs: np.ndarray, ours: np.ndarray) -> dict:
    theirs, ours = theirs.astype(np.float64), ours.astype(np.float64)
    cosine = (theirs * ours).sum(1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
    return {"client": name, "max_abs_diff": float(np.abs(theirs - ours).max()), "min_cosine": float(cosine.min()),
            "mean_cosine": float(cosine.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="e5", help="model folder, minilm or e5")
    parser.add_argument("--cache", default=str(REPO / "output" / "bench-models"))
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--st_onnx_python", help="python of a venv with sentence-transformers[onnx] (and kfdeb not needed)")
    parser.add_argument("--transformers_js", help="a folder holding node_modules/@huggingface/transformers")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    from kfdeb import cli
    from kfdeb.model import load_encoder
    from kfdeb.onnx import OnnxEncoder
    from kfdeb.readers import BUNDLED_DATA_DIR, read_sts, sts_path

    pairs = read_sts(sts_path(BUNDLED_DATA_DIR, "test"))
    sentences = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))[:args.sentences]
    print(f"model {args.model}, {len(sentences)} KorSTS test sentences, commit {git_commit()}, {cpu_model()}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = shutil.copytree(model_path(args.model, Path(args.cache)), work / "models" / "model")
        assert cli.export_main([str(folder), "--quantize", "int8"]) == 0
        (work / "sentences.json").write_text(json.dumps(sentences, ensure_ascii=False))
        encoder = load_encoder(folder)
        ours = encoder.encode(sentences, batch_size=32, convert_to_numpy=True)
        rows = []
        for name, graph in (("kfdeb ONNX fp32", "model.onnx"), ("kfdeb ONNX int8", "model.int8.onnx")):
            onnx = OnnxEncoder.load(folder / "onnx" / graph)
            rows.append(compare(name, onnx.encode(sentences, batch_size=32, convert_to_numpy=True), ours))
        if args.st_onnx_python:
            (work / "st.py").write_text(ST_SCRIPT)
            done = subprocess.run([args.st_onnx_python, str(work / "st.py"), str(folder), str(work / "sentences.json"),
                                   str(work / "st")], capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            print(done.stdout.strip().splitlines()[-1])
            rows.append(compare('sentence-transformers backend="onnx"', np.load(work / "st.onnx.npy"), ours))
            rows.append(compare("sentence-transformers PyTorch", np.load(work / "st.torch.npy"), ours))
        if args.transformers_js:
            script = Path(args.transformers_js) / "kfdeb_export_clients.mjs"  # beside node_modules, so Node finds it
            script.write_text(JS_SCRIPT)
            done = subprocess.run(["node", str(script), str(work / "models"), "model", str(work / "sentences.json"),
                                   "true" if encoder.normalize else "false", str(work / "js.json")],
                                  capture_output=True, text=True)
            script.unlink()
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            served = json.loads((work / "js.json").read_text())
            embeddings = np.array(served["rows"])
            rows.append(compare("transformers.js", embeddings, ours))
            # its JavaScript tokenizer against the one kfdeb and sentence-transformers use (tokenizers, Rust)
            ours_ids = [encoder.tokenizer(text)["input_ids"] for text in sentences]
            same = np.array([theirs == mine for theirs, mine in zip(served["tokens"], ours_ids)])
            for text, theirs, mine in zip(sentences, served["tokens"], ours_ids):
                if theirs != mine:
                    print(f"transformers.js tokenizes differently: {text!r}\n"
                          f"  tokenizers:      {encoder.tokenizer.convert_ids_to_tokens(mine)}\n"
                          f"  transformers.js: {encoder.tokenizer.convert_ids_to_tokens(theirs)}")
            if not same.all():
                rows.append(compare(f"transformers.js, the {int(same.sum())} sentences it tokenizes the same way",
                                    embeddings[same], ours[same]))
    print("\n| client | max abs difference to kfdeb PyTorch | min cosine | mean cosine |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['client']} | {row['max_abs_diff']:.1e} | {row['min_cosine']:.6f} | {row['mean_cosine']:.6f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "sentences": len(sentences), "commit": git_commit(),
                                               "cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
