"""kfdeb's ONNX export opened by transformers.js (Node), as a JavaScript service would serve it.

Not part of the default suite: it needs Node.js and `@huggingface/transformers` from npm. `.ci/run`
installs the package into a scratch folder (`npm install --ignore-scripts`: onnxruntime-node's
install script downloads from a host that is not reachable, and its CPU binary ships in the
package) and runs this file with KFDEB_TRANSFORMERS_JS naming that folder:

    KFDEB_TRANSFORMERS_JS=/path/with/node_modules python -m pytest -q tests/backend_transformers_js.py

transformers.js' `pipeline("feature-extraction", folder)` reads `onnx/model.onnx`, `config.json` and
`tokenizer.json`, tokenizes in JavaScript, feeds the inputs the graph declares, and mean-pools the
output it finds under `last_hidden_state` itself. Its embeddings must equal kfdeb's PyTorch ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kfdeb import cli
from kfdeb.model import load_encoder

SENTENCES = ["비행기가 이륙하고 있다.", "한 남자가 큰 플루트를 연주하고 있다.", "고양이", "A man is playing a flute."]
EMBED = """
import { pipeline, env } from '@huggingface/transformers';
const [root, model, sentences, normalize] = [process.argv[2], process.argv[3], JSON.parse(process.argv[4]),
                                             process.argv[5] === "true"];
env.localModelPath = root; env.allowRemoteModels = false;
const extractor = await pipeline('feature-extraction', model, { dtype: 'fp32' });
const output = await extractor(sentences, { pooling: 'mean', normalize });
console.log(JSON.stringify(output.tolist()));
"""


@pytest.fixture(scope="module")
def node_modules() -> Path:
    folder = Path(os.environ["KFDEB_TRANSFORMERS_JS"])  # a KeyError outside .ci/run's step: this file is run there
    assert (folder / "node_modules" / "@huggingface" / "transformers").is_dir(), folder
    return folder


@pytest.mark.parametrize("fixture", ["tiny_deberta", "tiny_bert", "tiny_xlmr"])  # tiny_xlmr: e5's layout
def test_transformers_js_equals_pytorch(request, fixture, node_modules, tmp_path):
    models = tmp_path / "models"
    folder = shutil.copytree(request.getfixturevalue(fixture), models / "model")
    assert cli.export_main([str(folder), "--max_seq_length", "64"]) == 0
    script = node_modules / "embed.mjs"  # beside node_modules, so Node resolves the package
    script.write_text(EMBED)
    encoder = load_encoder(folder, max_seq_length=64)
    normalize = "true" if encoder.normalize else "false"  # a folder ending in Normalize: as a user would call it
    result = subprocess.run(["node", str(script), str(models), "model", json.dumps(SENTENCES, ensure_ascii=False),
                             normalize], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    served = np.array(json.loads(result.stdout.strip().splitlines()[-1]), dtype=np.float32)
    ours = encoder.encode(SENTENCES, convert_to_numpy=True)
    print(f"{fixture}: max |transformers.js - PyTorch| {float(np.abs(served - ours).max()):.2e}")
    np.testing.assert_allclose(served, ours, rtol=0, atol=1e-5)
