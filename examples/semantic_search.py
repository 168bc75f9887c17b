"""Semantic search with a kfdeb model: the 5 corpus sentences closest to each query.

    python examples/semantic_search.py output/            # any kfdeb / HF / sentence-transformers folder
    python examples/semantic_search.py output/smoke       # the offline smoke model (tiny, untrained-quality)
"""

from __future__ import annotations

import argparse

import kfdeb
from kfdeb import cli

CORPUS = [
    "한국은행이 기준금리를 0.25%포인트 인상했다.",
    "중앙은행은 물가 안정을 위해 금리를 올렸다.",
    "주택담보대출 금리가 3개월 연속 상승했다.",
    "코스피 지수가 외국인 매도세에 2% 넘게 하락했다.",
    "원·달러 환율이 1,400원을 돌파했다.",
    "정부는 소상공인을 위한 저금리 대출 지원책을 발표했다.",
    "삼성전자의 3분기 영업이익이 시장 예상치를 웃돌았다.",
    "비트코인 가격이 하루 만에 10% 급등했다.",
    "예금 금리가 오르자 시중 자금이 은행으로 몰리고 있다.",
]
QUERIES = [
    "금리 인상 소식",
    "주식 시장이 크게 떨어졌다.",
    "가상화폐 시세가 올랐다.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-5 semantic search over a small Korean financial corpus.")
    parser.add_argument("ckpt", help="kfdeb output dir, Hugging Face or sentence-transformers folder, or model.onnx")
    parser.add_argument("--top_k", type=int, default=5)
    args = parser.parse_args(argv)
    cli.quiet_third_party()
    model = kfdeb.load(args.ckpt)
    corpus_embeddings = model.encode(CORPUS)
    query_embeddings = model.encode(QUERIES)
    scores, indices = kfdeb.top_k(query_embeddings, corpus_embeddings, k=args.top_k)
    for query, row_scores, row_indices in zip(QUERIES, scores.tolist(), indices.tolist()):
        print("\n\n======================\n\n")
        print("Query:", query)
        print(f"\nTop {len(row_indices)} most similar sentences in corpus:")
        for score, index in zip(row_scores, row_indices):
            print(CORPUS[index], f"(Score: {score:.4f})")
    return 0


if __name__ == "__main__":
    cli.execute(main)
