"""Retrieval data: a BEIR folder, or a file of relevant pairs, read strictly into queries, corpus and grades.

BEIR layout (BEIR, mteb and most Korean retrieval sets):
    corpus.jsonl       {"_id": ..., "title": ..., "text": ...} one document a line; a document is
                       title + " " + text when the title is not empty (as BEIR and mteb join them)
    queries.jsonl      {"_id": ..., "text": ...}
    qrels/SPLIT.tsv    header `query-id  corpus-id  score`: graded relevance, 0 = not relevant
A pairs file (.tsv/.csv/.jsonl, the own-data formats) of `anchor, positive` or `query, document`
rows: the corpus is the distinct positives (documents), each anchor's relevant documents its
positives (grade 1); an anchor in several rows is one query.

What is evaluated: the queries with at least one document graded above 0 in the split (trec_eval
and mteb leave the others out); the whole corpus is searched. Ids are strings (a number in the
JSON is taken as its decimal text). Every problem stops with `file:line: field: problem`: a line
that is not a JSON object, a missing `_id` or `text`, an id given twice, an empty text, a qrels
row naming a query or document the files do not have, a grade that is not an integer, a qrels
file with no grade above 0; a folder without qrels/SPLIT.tsv names the splits it has.

The bundled sets (kfdeb/bundled/retrieval/, built by the functions at the end, checked by the
tests to be what these functions build from the bundled files):
- korsts-dev, korsts-test: paraphrase retrieval from KorSTS dev / test. Queries: each distinct
  sentence1 of a pair scored >= 4; corpus: the split's distinct sentence2s; relevant (grade 1): the
  sentence2s it is paired with at >= 4, and a corpus sentence identical to the query (the same
  sentence is its own paraphrase). It measures finding a paraphrase among short sentences, not
  passage retrieval.
- xnli-test: each XNLI test premise with an entailment is a query, its entailment hypothesis the
  relevant document, the corpus every test hypothesis (5,009): the premise's own neutral and
  contradiction hypotheses, on the same topic with the same words, are the distractors. It is what
  the NLI recipe teaches, so a run reporting on it must not train on xnli.test.ko.tsv (train on
  xnli.dev.ko.tsv): `trained_on` finds that mix (each bundled set lists its source files' sha256 in
  sources.json), and a run refuses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from kfdeb.errors import UserInputError
from kfdeb.readers import (
    BUNDLED_DATA_DIR, OWN_FORMATS, RELEVANT_PAIR_KINDS, StsPair, decode, read_csv, read_jsonl, read_own_file, read_tsv,
)

BUNDLED_RETRIEVAL_DIR = BUNDLED_DATA_DIR.parent / "retrieval"
BUNDLED_PREFIX = "kfdeb:"  # kfdeb:korsts-dev: a set shipped with kfdeb
SOURCES_FILE = "sources.json"  # a bundled set's source files: sha256 -> name (what it must not be trained on)
QRELS_COLUMNS = ("query-id", "corpus-id", "score")


@dataclass
class IrData:
    name: str  # what tables call it: "korsts-dev (dev)", "faq.jsonl"
    queries: dict[str, str]  # the evaluated queries: id -> text
    corpus: dict[str, str]  # every document: id -> text
    relevant: dict[str, dict[str, int]]  # query id -> {document id: grade > 0}


def read_ir_data(source: str | os.PathLike, split: str = "test", flag: str = "--ir_data") -> IrData:
    """A BEIR folder's `split`, or a pairs file (module docstring)."""
    if str(source).startswith(BUNDLED_PREFIX):
        name = str(source)[len(BUNDLED_PREFIX):]
        bundled = sorted(p.name for p in BUNDLED_RETRIEVAL_DIR.iterdir() if p.is_dir())
        if name not in bundled:
            raise UserInputError(f"{source}: {flag}: no bundled retrieval set of that name "
                                 f"(bundled: {', '.join(BUNDLED_PREFIX + b for b in bundled)})")
        source = BUNDLED_RETRIEVAL_DIR / name
    path = Path(source)
    if path.is_dir():
        return read_beir(path, split)
    if path.suffix.lower() in OWN_FORMATS and path.is_file():
        return read_relevant_pairs(path, flag)
    if not path.exists():
        raise UserInputError(f"{path}: {flag}: no such folder or file")
    raise UserInputError(f"{path}: {flag}: expected a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) or a "
                         f"{', '.join(OWN_FORMATS)} file of pairs")


def source_files(source: str | os.PathLike, split: str) -> list[Path]:
    """The files `read_ir_data(source, split)` reads (for the nodes' data check, tasks.py)."""
    if str(source).startswith(BUNDLED_PREFIX):
        source = BUNDLED_RETRIEVAL_DIR / str(source)[len(BUNDLED_PREFIX):]
    path = Path(source)
    if path.is_dir():
        return [path / "corpus.jsonl", path / "queries.jsonl", path / "qrels" / f"{split}.tsv"]
    return [path]


def _id(path: Path, line_no: int, row: dict[str, Any]) -> str:
    value = row.get("_id")
    if value is None:
        raise UserInputError(f"{path}:{line_no}: _id: missing key")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise UserInputError(f"{path}:{line_no}: _id: expected a non-empty string, got {value!r}")
    return str(value)


def _text(path: Path, line_no: int, row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise UserInputError(f"{path}:{line_no}: {key}: missing key")
        return ""
    if not isinstance(value, str):
        raise UserInputError(f"{path}:{line_no}: {key}: expected a string, got {value!r}")
    return value


def _read_texts(path: Path, with_title: bool) -> dict[str, str]:
    """id -> text of a corpus.jsonl (title joined) or queries.jsonl; every id once, every text non-empty."""
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line_no, row in read_jsonl(path):
        identifier = _id(path, line_no, row)
        text = _text(path, line_no, row, "text")
        if with_title:
            title = _text(path, line_no, row, "title", required=False)
            text = f"{title} {text}" if title.strip() else text
        if not text.strip():
            raise UserInputError(f"{path}:{line_no}: text: empty text")
        if identifier in lines:
            raise UserInputError(f"{path}:{line_no}: _id: {identifier!r} given twice (first on line {lines[identifier]})")
        lines[identifier] = line_no
        texts[identifier] = text
    if not texts:
        raise UserInputError(f"{path}:1: no data rows")
    return texts


def read_beir(folder: Path, split: str) -> IrData:
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        has = f"the folder has {', '.join(splits)}" if splits else "the folder has no qrels/*.tsv"
        raise UserInputError(f"{qrels_path}: no split {split!r} ({has}); a BEIR folder holds corpus.jsonl, "
                             "queries.jsonl and qrels/SPLIT.tsv")
    corpus = _read_texts(folder / "corpus.jsonl", with_title=True)
    queries = _read_texts(folder / "queries.jsonl", with_title=False)
    relevant: dict[str, dict[str, int]] = {}
    for line_no, row in read_tsv(qrels_path, QRELS_COLUMNS):
        query, document = row["query-id"], row["corpus-id"]
        if query not in queries:
            raise UserInputError(f"{qrels_path}:{line_no}: query-id: {query!r} is not in queries.jsonl")
        if document not in corpus:
            raise UserInputError(f"{qrels_path}:{line_no}: corpus-id: {document!r} is not in corpus.jsonl")
        try:
            grade = int(row["score"])
        except ValueError:
            raise UserInputError(f"{qrels_path}:{line_no}: score: not an integer grade: {row['score']!r}") from None
        if grade > 0:
            relevant.setdefault(query, {})[document] = grade
    if not relevant:
        raise UserInputError(f"{qrels_path}:2: score: no grade above 0: no query has a relevant document")
    name = f"{folder.name} ({split})"
    return IrData(name, {q: queries[q] for q in relevant}, corpus, relevant)


def read_relevant_pairs(path: Path, flag: str = "--ir_data") -> IrData:
    """A file of (anchor, positive) or (query, document) rows as queries, corpus and grades (module docstring)."""
    rows = read_own_file(path, RELEVANT_PAIR_KINDS, flag).rows
    return relevant_pairs(path.name, [(row[0], row[1]) for row in rows])


def relevant_pairs(name: str, pairs: Iterable[tuple[str, str]]) -> IrData:
    """Queries (the distinct first texts), corpus (the distinct second texts), each query's seconds relevant."""
    query_ids: dict[str, str] = {}
    document_ids: dict[str, str] = {}
    relevant: dict[str, dict[str, int]] = {}
    for query, document in pairs:
        q = query_ids.setdefault(query, f"q{len(query_ids) + 1}")
        d = document_ids.setdefault(document, f"d{len(document_ids) + 1}")
        relevant.setdefault(q, {})[d] = 1
    return IrData(name, {q: text for text, q in query_ids.items()}, {d: text for text, d in document_ids.items()},
                  relevant)


def read_texts(path: Path, flag: str = "--corpus") -> list[str]:
    """A corpus file's texts: .txt one a line; .jsonl objects with `text` (and `title`, joined as in a BEIR
    corpus); .tsv / .csv with a `text` column. Every text non-empty."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        try:
            lines = decode(path.read_bytes(), str(path)).split("\n")
        except OSError as err:
            raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
        if lines and lines[-1] == "":
            lines.pop()
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                raise UserInputError(f"{path}:{line_no}: text: empty line")
        return [line.removesuffix("\r") for line in lines]
    if suffix == ".jsonl":
        return list(_jsonl_texts(path))
    if suffix in (".tsv", ".csv"):
        rows = read_tsv(path, ("text",)) if suffix == ".tsv" else read_csv(path)
        texts = []
        for line_no, row in rows:
            if "text" not in row:
                raise UserInputError(f"{path}:1: header: missing column 'text'")
            if not row["text"].strip():
                raise UserInputError(f"{path}:{line_no}: text: empty text")
            texts.append(row["text"])
        return texts
    raise UserInputError(f"{path}: {flag}: unknown format {suffix or '(no extension)'!r} (expected .txt, .jsonl, .tsv, .csv)")


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for line_no, row in read_jsonl(path):
        text = _text(path, line_no, row, "text")
        title = _text(path, line_no, row, "title", required=False)
        text = f"{title} {text}" if title.strip() else text
        if not text.strip():
            raise UserInputError(f"{path}:{line_no}: text: empty text")
        texts.append(text)
    return texts


# the bundled sets (module docstring) --------------------------------------------------------------

def korsts_paraphrase_set(pairs: Sequence[StsPair], min_score: float = 4.0) -> IrData:
    """KorSTS pairs as paraphrase retrieval: queries the sentence1s of pairs scored >= min_score, corpus the
    distinct sentence2s, relevant the paired sentence2s and a corpus sentence identical to the query."""
    document_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(p.sentence2 for p in pairs), 1)}
    query_ids: dict[str, str] = {}
    relevant: dict[str, dict[str, int]] = {}
    for pair in pairs:
        if pair.label * 5.0 >= min_score:
            q = query_ids.setdefault(pair.sentence1, f"q{len(query_ids) + 1}")
            grades = relevant.setdefault(q, {})
            grades[document_ids[pair.sentence2]] = 1
            if pair.sentence1 in document_ids:
                grades[document_ids[pair.sentence1]] = 1
    return IrData("korsts", {q: text for text, q in query_ids.items()},
                  {d: text for text, d in document_ids.items()}, relevant)


def xnli_entailment_set(pairs: Sequence[tuple[str, str, str]]) -> IrData:
    """XNLI pairs as retrieval: queries the premises that have an entailment, corpus every distinct hypothesis,
    relevant the premise's entailment hypotheses; its own neutral and contradiction hypotheses (same topic, same
    words) are the distractors that make it hard."""
    document_ids = {text: f"d{i}" for i, text in enumerate(dict.fromkeys(h for _, h, _ in pairs), 1)}
    query_ids: dict[str, str] = {}
    relevant: dict[str, dict[str, int]] = {}
    for premise, hypothesis, label in pairs:
        if label == "entailment":
            q = query_ids.setdefault(premise, f"q{len(query_ids) + 1}")
            relevant.setdefault(q, {})[document_ids[hypothesis]] = 1
    return IrData("xnli", {q: text for text, q in query_ids.items()},
                  {d: text for text, d in document_ids.items()}, relevant)


def trained_on(source: str | os.PathLike, training_digests: dict[str, str]) -> tuple[str, str] | None:
    """(the source file, the training file) when a bundled retrieval set was built from a file the run trains on
    (`training_digests`: sha256 -> name): retrieval on the very pairs trained on would measure memory."""
    if not str(source).startswith(BUNDLED_PREFIX):
        return None
    sources = BUNDLED_RETRIEVAL_DIR / str(source)[len(BUNDLED_PREFIX):] / SOURCES_FILE
    built_from = json.loads(sources.read_text(encoding="utf-8")) if sources.is_file() else {}
    return next(((name, training_digests[digest]) for digest, name in built_from.items() if digest in training_digests),
                None)


def write_beir(data: IrData, folder: Path, split: str) -> None:
    """`data` as a BEIR folder (corpus.jsonl with empty titles, queries.jsonl, qrels/SPLIT.tsv)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": "", "text": text}, ensure_ascii=False) + "\n" for d, text in data.corpus.items()),
        encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": text}, ensure_ascii=False) + "\n" for q, text in data.queries.items()),
        encoding="utf-8")
    rows = [f"{q}\t{d}\t{grade}\n" for q, grades in data.relevant.items() for d, grade in grades.items()]
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(rows), encoding="utf-8")
