"""kfdeb.inference_dtype and encode's dtype: bf16/fp16 embeddings against sentence-transformers' float32 ones,
retrieval figures against its InformationRetrievalEvaluator's, `auto` on given CPU flags and GPUs, the CLI line,
training's --eval_dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import RecordOps, run_main
from kfdeb import inference_dtype
from kfdeb.batching import length_sorted_chunks
from kfdeb.errors import UserInputError
from kfdeb.inference_dtype import resolve_dtype

import sentence_transformers as st  # noqa: E402  (the [test] extra: the reference is always there in CI)

SENTENCES = ["첫 번째 문장입니다.", "두 번째, 조금 더 긴 문장입니다.", "셋", "오늘 날씨가 맑고 따뜻합니다.",
             "한국어 문장 임베딩 모델을 학습합니다.", "가나다라마바사 아자차카타파하"] * 3
PRODUCTS = {"addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_linear_pointwise"}
# The bounds. Rounding a product's inputs to bf16 (8 significant bits) costs it a relative error of about
# 2^-9 = 0.2% (fp16, 11 bits: 2^-12), the sums staying float32 inside the kernels. A 2-layer encoder has ~12
# products in series on a token's path, whose errors add at worst: 12 x 0.2% = 2.3%, and an embedding off by a
# relative delta has cosine >= 1 - delta^2 / 2 to the exact one (0.9997). Random weights amplify errors more than
# trained ones do, so bf16 is asked 0.999 (delta <= 4.5%); fp16's 8x finer rounding gives 64x less:
# 1 - 0.001 / 64 ~ 0.99998. Random-weight models put every sentence near one common direction, which hides
# errors from a plain cosine, so the embeddings centred on their float32 mean are held to the same bound.
MIN_COSINE = {torch.bfloat16: 0.999, torch.float16: 0.99998}
# nDCG@10 (x100) of 261 queries: one swap of the first two documents of one query moves the mean by at most
# 100 x (1 - 1/log2(3)) / 261 = 0.14; 0.4 allows about three such swaps (random weights leave near ties)
NDCG_BOUND = 0.4


@pytest.fixture(scope="module")
def loud_models(tmp_path_factory, tiny_deberta) -> dict:
    """Tiny BERT and DeBERTa-v2 with weights drawn at std 0.2 instead of 0.02: at 0.02 the layers barely move
    the residual stream, so the embeddings (and their rounding) are the token embeddings' and a test of the
    products' precision could not fail; at 0.2 the layers dominate, as in a trained model."""
    from transformers import AutoTokenizer, BertConfig, BertModel, DebertaV2Model

    from kfdeb.tiny import tiny_deberta_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta)
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, initializer_range=0.2)
    deberta = tiny_deberta_config(len(tokenizer), dropout=0.0)
    deberta.initializer_range = 0.2
    folders = {}
    for name, model_class, config in (("bert", BertModel, bert), ("deberta", DebertaV2Model, deberta)):
        torch.manual_seed(1)
        folders[name] = tmp_path_factory.mktemp(f"loud-{name}")
        model_class(config).save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["bert", "deberta"])
def test_every_embedding_stays_within_the_bound_of_float32(loud_models, name, dtype):
    import kfdeb

    exact = st.SentenceTransformer(str(loud_models[name]), device="cpu").encode(
        SENTENCES, convert_to_tensor=True, batch_size=4)
    model = kfdeb.load(loud_models[name], device="cpu", dtype=inference_dtype.dtype_name(dtype))
    model.encode(SENTENCES[:1])  # once before recording: the process's first encode checks the CPU kernel
    with RecordOps() as ops:
        got = model.encode(SENTENCES, batch_size=4)
    assert got.dtype == torch.float32
    products = [(op, inputs) for op, inputs, _ in ops.calls if op in PRODUCTS]
    pooling = ("bmm", [torch.float32, torch.float32])  # the mean pooling's product, one a batch, in float32 ...
    batches = len(length_sorted_chunks(model.tokenize(SENTENCES), 4, model.pad_id)[0])
    assert products[-1] == pooling and products.count(pooling) == batches
    assert {inputs[0] for product, inputs in products if (product, inputs) != pooling} == {dtype}  # ... all else not
    centre = exact.mean(0)
    plain, centred = F.cosine_similarity(got, exact), F.cosine_similarity(got - centre, exact - centre)
    assert plain.min().item() >= MIN_COSINE[dtype] and centred.min().item() >= MIN_COSINE[dtype]
    assert centred.min().item() < 1 - 1e-7  # the products' rounding shows: the bound is tested, not trivially met


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_retrieval_ndcg_stays_within_the_bound_of_float32(loud_models, dtype):
    import kfdeb
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from kfdeb.ir_data import BUNDLED_RETRIEVAL_DIR, read_beir
    from kfdeb.retrieval import evaluate_retrieval

    data = read_beir(BUNDLED_RETRIEVAL_DIR / "korsts-dev", "dev")
    evaluator = InformationRetrievalEvaluator(
        data.queries, data.corpus, {q: set(grades) for q, grades in data.relevant.items()}, ndcg_at_k=[10],
        write_csv=False, score_functions={"cosine": st.util.cos_sim}, main_score_function="cosine")
    exact = 100 * evaluator(st.SentenceTransformer(str(loud_models["bert"]), device="cpu"))["cosine_ndcg@10"]
    got = evaluate_retrieval(kfdeb.load(loud_models["bert"], device="cpu", dtype=dtype), data).figures["ndcg@10"]
    assert abs(got - exact) <= NDCG_BOUND


@pytest.mark.parametrize("flags, expected, reason", [
    ("fpu sse avx512f amx_bf16 amx_tile avx512_bf16", torch.bfloat16, "auto: the CPU has amx_bf16 and avx512_bf16"),
    ("fpu avx512f avx512_bf16", torch.bfloat16, "auto: the CPU has avx512_bf16"),
    ("fpu avx2 avx512f avx512_vnni", torch.float32, "auto: the CPU has neither amx_bf16 nor avx512_bf16"),
])
def test_auto_on_a_cpu_reads_its_flags(flags, expected, reason, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(inference_dtype, "CPUINFO", cpuinfo)
    monkeypatch.setattr(inference_dtype.sys, "platform", "linux")
    assert resolve_dtype("auto", "cpu") == (expected, reason)
    monkeypatch.setattr(inference_dtype.sys, "platform", "darwin")  # no /proc/cpuinfo to read: float32
    assert resolve_dtype("auto", "cpu")[0] == torch.float32


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float32)])
def test_auto_on_a_gpu_asks_for_native_bf16(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, reason = resolve_dtype("auto", "cuda")
    assert dtype == expected and f"compute capability {capability[0]}.{capability[1]}" in reason


def test_named_dtypes_are_taken_as_asked_and_others_refused():
    assert resolve_dtype("float16", "cpu") == (torch.float16, "asked for")
    assert resolve_dtype(torch.bfloat16, "cuda") == (torch.bfloat16, "asked for")
    with pytest.raises(UserInputError, match="dtype 'fp8': expected float32, bfloat16, float16 or auto"):
        resolve_dtype("fp8", "cpu")


def test_an_onnx_model_computes_in_float32_only(tmp_path):
    import kfdeb

    with pytest.raises(UserInputError, match="dtype bfloat16: an ONNX graph computes in the dtype it was exported"):
        kfdeb.load(tmp_path / "model.onnx", dtype="bfloat16")  # refused before the file is looked for
    from kfdeb.onnx_runtime import onnx_dtype

    assert onnx_dtype("auto").startswith("auto:") and onnx_dtype(None) == "the default"


def test_evaluate_and_mine_say_which_dtype_and_why(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(inference_dtype, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    result = run_main("evaluate.py", tiny_bert, "--dtype", "auto", "--max_seq_length", "64")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "dtype: bfloat16 (auto: the CPU has amx_bf16)"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("anchor,positive\n카드 분실,카드를 잃어버렸어요\n대출 금리,금리가 얼마인가요\n환전,달러로 바꾸고 싶어요\n",
                     encoding="utf-8")
    result = run_main("mine.py", tiny_bert, "--pairs", pairs, "--output", tmp_path / "out.jsonl", "--dtype",
                      "float16", "--num_negatives", "1", "--progress", "false")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "dtype: float16 (--dtype float16)"


def test_training_evaluates_in_eval_dtype(tiny_deberta, small_data, tmp_path, monkeypatch, capsys):
    from kfdeb import model as model_module
    from kfdeb.config import resolve
    from kfdeb.loop import train

    used = []
    real = model_module.computing_in
    monkeypatch.setattr(model_module, "computing_in", lambda dtype, device: used.append(dtype) or real(dtype, device))
    train(resolve({"model_name_or_path": str(tiny_deberta), "data_dir": str(small_data), "max_steps": 1,
                   "eval_steps": 1, "save_steps": 1, "logging_steps": 1, "nli_batch_size": 8, "sts_batch_size": 8,
                   "max_seq_length": 32, "output_dir": str(tmp_path / "run"), "progress": False,
                   "eval_dtype": "bfloat16"}))
    assert used and set(used) == {torch.bfloat16}  # the dev evaluation and the final dev and test ones
    assert "evaluations in bfloat16 (--eval_dtype bfloat16)" in capsys.readouterr().out


def test_a_float16_overflow_is_a_one_line_error_not_inf_embeddings(tiny_bert):
    import kfdeb

    model = kfdeb.load(tiny_bert, device="cpu", dtype="float16")
    with torch.no_grad():
        model.transformer.encoder.layer[0].intermediate.dense.weight.mul_(1e6)  # products beyond fp16's 65504
    assert torch.isfinite(model.encode(SENTENCES[:4], dtype="float32")).all()  # float32 holds them
    with pytest.raises(UserInputError, match="dtype float16: the encoder's activations overflowed"):
        model.encode(SENTENCES[:4])
