"""Reading training and evaluation files: KorNLU's TSV files and your own .tsv/.csv/.jsonl files, strictly.

Every problem stops the run with `file:line: field: problem` (UserInputError, exit status 2);
nothing is skipped silently. All files: UTF-8 (a leading BOM is accepted; a bad byte is reported
with its line and its offset in that line; a CP949/EUC-KR file, Korean saved on Windows, is named as
such with the iconv command that converts it: decoding.py), LF or CRLF line ends.

KorNLU files (github.com/kakaobrain/kor-nlu-datasets, CC BY-SA 4.0) are tab-separated with a
header row and no quoting: a `"` is an ordinary character (csv.QUOTE_NONE), and they are read line
by line (KorNLI train is 263 MB):
- KorSTS (genre filename year id score sentence1 sentence2) -> pairs with label = score / 5.
- KorNLI (sentence1 sentence2 gold_label) -> (sentence1, sentence2, label) pairs. SNLI marks pairs
  without annotator consensus with gold_label "-": they carry no label, are not used, and are
  counted (batching.py builds the recipe's triplets from the pairs).

Your own files (`read_own_file`): the format by extension, the row kind by the columns (.tsv,
.csv header) or keys (.jsonl, every object):
- .tsv: as KorNLU above. .csv: RFC 4180 (header row, `,` separator, `"`-quoted fields with `""`
  for a quote, line breaks allowed inside quotes). Read by the parser below rather than Python's
  csv module, which agrees with it on every valid file (tests/test_readers.py checks) but accepts
  two things that would silently change the data: a `"` inside an unquoted field (kept as text) and
  a carriage return alone (taken as the end of a record); here both are errors, as is text after a
  closing quote and a quote never closed. .jsonl: one JSON object a line; other keys are ignored.
- sentence1, sentence2, gold_label: NLI pairs (the triplets of the recipe, as KorNLI);
  anchor, positive, negative: triplets as they are; anchor, positive, negative_1 ... negative_n:
  n-tuples (mine.py's output, sentence-transformers' column names); anchor, positive: pairs
  (in-batch negatives without a hard negative); sentence1, sentence2, score: scored pairs,
  label = score / score_max; query, document: relevant pairs for retrieval evaluation.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from kfdeb.decoding import decode
from kfdeb.errors import UserInputError

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "bundled" / "kor-nlu"
STS_COLUMNS = ("score", "sentence1", "sentence2")
STS_SPLITS = {"train": "sts-train.tsv", "dev": "sts-dev.tsv", "test": "sts-test.tsv"}
NLI_COLUMNS = ("sentence1", "sentence2", "gold_label")
NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_NO_CONSENSUS = "-"
KORNLU_CLONE = "git clone https://github.com/kakaobrain/kor-nlu-datasets"


class StsPair(NamedTuple):
    sentence1: str
    sentence2: str
    label: float  # score / score_max (5 for KorSTS), in [0, 1]


class Triplet(NamedTuple):
    anchor: str
    positive: str
    negative: str


def read_tsv(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, {column: field}) for every data row; header names locate the columns."""
    path = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    with handle:
        header: list[str] | None = None
        for line_no, raw in enumerate(handle, start=1):
            line = decode(raw, path, line_no).rstrip("\n").rstrip("\r")
            fields = line.split("\t")
            if header is None:
                header = fields
                missing = [name for name in required if name not in header]
                if missing:
                    raise UserInputError(
                        f"{path}:1: header: missing column {missing[0]!r} (header has {', '.join(header)})"
                    )
                continue
            yield line_no, _table_row(path, line_no, header, fields, "tab-separated")
        if header is None:
            raise UserInputError(f"{path}:1: header: file is empty")


def _table_row(path: str, line_no: int, header: list[str], fields: list[str], separated: str) -> dict[str, str]:
    """{column: field} of a .tsv or .csv data row, which must have as many fields as the header."""
    if fields == [""]:
        raise UserInputError(f"{path}:{line_no}: empty line (expected {len(header)} {separated} fields)")
    if len(fields) != len(header):
        where = header[len(fields)] if len(fields) < len(header) else f"field {len(header) + 1}"
        raise UserInputError(f"{path}:{line_no}: {where}: expected {len(header)} {separated} fields, found {len(fields)}")
    return dict(zip(header, fields))


def _field_text(path: str, line_no: int, row: dict[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str):  # a .jsonl value that is a number, null, list or object
        raise UserInputError(f"{path}:{line_no}: {column}: expected a string, got {json.dumps(value, ensure_ascii=False)}")
    return value


def _sentence(path: str, line_no: int, row: dict[str, Any], column: str) -> str:
    text = _field_text(path, line_no, row, column).strip()
    if not text:
        raise UserInputError(f"{path}:{line_no}: {column}: empty sentence")
    return text


def scored_pairs_from_rows(path: str | os.PathLike, rows: Iterable[tuple[int, dict[str, Any]]],
                           score_max: float) -> list[StsPair]:
    """Pairs with label = score / score_max (score must be a number in 0..score_max)."""
    pairs = []
    for line_no, row in rows:
        value = row["score"]
        shown = repr(value) if isinstance(value, str) else json.dumps(value)
        try:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # .jsonl true, null, [...]
                raise ValueError
            score = float(value)
        except ValueError:
            raise UserInputError(f"{path}:{line_no}: score: not a number: {shown}") from None
        if not 0.0 <= score <= score_max:  # also rejects nan
            raise UserInputError(f"{path}:{line_no}: score: {shown} is outside 0..{score_max:g}")
        pairs.append(StsPair(_sentence(path, line_no, row, "sentence1"), _sentence(path, line_no, row, "sentence2"),
                             score / score_max))
    if not pairs:
        raise UserInputError(f"{path}:2: score: no data rows")
    return pairs


def read_sts(path: str | os.PathLike) -> list[StsPair]:
    """KorSTS pairs; label = score / 5 (score must be a number in 0..5)."""
    return scored_pairs_from_rows(path, read_tsv(path, STS_COLUMNS), 5.0)


@dataclass
class NliPairs:
    pairs: list[tuple[str, str, str]]  # (sentence1, sentence2, gold_label)
    skipped_no_consensus: int


def read_nli(path: str | os.PathLike) -> NliPairs:
    """KorNLI pairs with their gold label; gold_label "-" (no consensus) rows are counted, not used."""
    return nli_pairs_from_rows(path, read_tsv(path, NLI_COLUMNS))


def nli_pairs_from_rows(path: str | os.PathLike, rows: Iterable[tuple[int, dict[str, Any]]]) -> NliPairs:
    """NLI pairs of (line number, row) items, as `read_nli` reads them from a KorNLI file."""
    pairs, skipped = [], 0
    for line_no, row in rows:
        label = _field_text(path, line_no, row, "gold_label").strip()
        if label == NLI_NO_CONSENSUS:
            skipped += 1
            continue
        if label not in NLI_LABELS:
            raise UserInputError(
                f"{path}:{line_no}: gold_label: unknown label {row['gold_label']!r} (expected one of {', '.join(NLI_LABELS)})"
            )
        pairs.append((_sentence(path, line_no, row, "sentence1"), _sentence(path, line_no, row, "sentence2"), label))
    return NliPairs(pairs, skipped)


def find_nli_files(data_dir: str | os.PathLike, pattern: str) -> list[Path]:
    """The KorNLI training files matching `pattern` under `data_dir`, sorted; none found is an error."""
    files = sorted(Path(p) for p in glob.glob(str(Path(data_dir) / pattern)))
    if not files:
        raise UserInputError(
            f"{Path(data_dir) / pattern}: no KorNLI training file matches; get them with `{KORNLU_CLONE}` "
            f"and pass --data_dir, or use the bundled ones: --data_dir {BUNDLED_DATA_DIR} --nli_train_glob 'KorNLI/xnli.*.ko.tsv'"
        )
    return files


OWN_FORMATS = (".tsv", ".csv", ".jsonl")
ROW_KINDS: dict[str, tuple[str, ...]] = {  # a kind's columns (.tsv, .csv) or keys (.jsonl)
    "nli": NLI_COLUMNS,
    "triplet": ("anchor", "positive", "negative"),
    "pair": ("anchor", "positive"),
    "scored": ("sentence1", "sentence2", "score"),
    "query": ("query", "document"),
    "tuple": ("anchor", "positive", "negative_1"),  # and negative_2 ... negative_n, as mine.py writes them
}
ROW_KIND_NAMES = {"nli": "NLI pairs", "triplet": "triplets", "pair": "anchor-positive pairs", "scored": "scored pairs",
                  "query": "query-document pairs", "tuple": "n-tuples"}
IN_BATCH_KINDS = ("nli", "tuple", "triplet", "pair")  # in this order: a triplet file also has a pair's columns
SCORED_KINDS = ("scored",)
RELEVANT_PAIR_KINDS = ("pair", "query")  # retrieval pairs (ir_data.py): each anchor or query and a relevant text
# .csv: a quoted field (`""` is a quote inside it; unrolled so an unclosed quote fails in linear time)
# and an unquoted one (up to the next separator, quote or line end)
_CSV_QUOTED = re.compile(r'"([^"]*(?:""[^"]*)*)"')
_CSV_PLAIN = re.compile(r'[^,"\r\n]*')


@dataclass
class OwnFile:
    """One of the user's files, read: its row kind and its rows."""

    path: str
    kind: str  # a key of ROW_KINDS
    rows: list  # nli: (sentence1, sentence2, gold_label); triplet: Triplet; pair: (anchor, positive); scored: StsPair
    skipped_no_consensus: int = 0  # nli: gold_label "-" rows, counted and not used


def _decoded_text(path: str) -> str:
    """The whole file as text (`decode`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    return decode(data, path)


def read_csv(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (first line of the record, {column: field}) for every data row of an RFC 4180 CSV file."""
    path = str(path)
    text = _decoded_text(path)
    header: list[str] | None = None
    line_no, pos, end = 1, 0, len(text)
    while pos < end:
        first_line, fields = line_no, []
        while True:  # one field per turn, then what ends it: a separator, a line end or the end of the file
            if header is None:
                column = "header"
            else:
                column = header[len(fields)] if len(fields) < len(header) else f"field {len(fields) + 1}"
            quoted = text.startswith('"', pos)
            match = (_CSV_QUOTED if quoted else _CSV_PLAIN).match(text, pos)
            # a quoted field followed by a quote: the pattern fell back from `""` pairs because no
            # closing quote came before the end of the file
            if match is None or (quoted and text.startswith('"', match.end())):
                raise UserInputError(f"{path}:{line_no}: {column}: quoted field not closed before the end of the "
                                     "file (a quote inside a quoted field is written \"\")")
            fields.append(match.group(1).replace('""', '"') if quoted else match.group(0))
            line_no += match.group(0).count("\n")
            pos = match.end()
            if pos == end:
                break
            if text[pos] == ",":
                pos += 1
                continue
            if text.startswith("\n", pos) or text.startswith("\r\n", pos):
                pos += 1 if text[pos] == "\n" else 2
                line_no += 1
                break
            if quoted:
                problem = f"{text[pos]!r} after the closing quote (expected a comma or the end of the line)"
            elif text[pos] == '"':
                problem = "a quote inside an unquoted field (quote the whole field and write the quote as \"\")"
            else:
                problem = "a carriage return that does not end the line"
            raise UserInputError(f"{path}:{line_no}: {column}: {problem}")
        if header is None:
            header = fields
            continue
        yield first_line, _table_row(path, first_line, header, fields, "comma-separated")
    if header is None:
        raise UserInputError(f"{path}:1: header: file is empty")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every line of a JSON Lines file; each line must be one object."""
    path = str(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise UserInputError(f"{path}: cannot open ({err.strerror})") from None
    with handle:  # line by line: a corpus of a million documents is never one string
        for line_no, raw in enumerate(handle, start=1):
            yield line_no, _json_object(path, line_no, decode(raw, path, line_no).removesuffix("\n").removesuffix("\r"))


def _json_object(path: str, line_no: int, line: str) -> dict[str, Any]:
    if not line.strip():
        raise UserInputError(f"{path}:{line_no}: empty line (expected one JSON object)")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}:{line_no}: json: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"{path}:{line_no}: json: expected an object {{...}}, got {type(value).__name__}")
    return value


def _columns_shown(kind: str) -> str:
    return "anchor, positive, negative_1 .. negative_n" if kind == "tuple" else ", ".join(ROW_KINDS[kind])


def _row_kind(path: str, line_no: int, names: Sequence[str], kinds: Sequence[str], flag: str, where: str) -> str:
    """The first of `kinds` whose columns are all in `names`; otherwise an error saying what the file holds."""
    for kind in kinds:
        if all(column in names for column in ROW_KINDS[kind]):
            return kind
    described = [f"{ROW_KIND_NAMES[k]} ({_columns_shown(k)})" for k in kinds]
    takes = " or ".join(filter(None, [", ".join(described[:-1]), described[-1]]))
    other = next((k for k in ROW_KINDS if all(column in names for column in ROW_KINDS[k])), None)
    holds = (f"{ROW_KIND_NAMES[other]} ({_columns_shown(other)})" if other is not None
             else f"{', '.join(names) or 'nothing'}, no row kind")
    raise UserInputError(f"{path}:{line_no}: {where}: {holds}, but {flag} takes {takes}")


def read_own_file(path: str | os.PathLike, kinds: Sequence[str], flag: str, score_max: float = 5.0) -> OwnFile:
    """One of the user's files (module docstring): its format by extension, its row kind among `kinds`.

    `flag` names the option that gave the file, for messages; `score_max` scales scored pairs.
    """
    path = str(path)
    suffix = Path(path).suffix.lower()
    if suffix not in OWN_FORMATS:
        raise UserInputError(f"{path}: {flag}: unknown format {suffix or '(no extension)'!r} "
                             f"(expected {', '.join(OWN_FORMATS)})")
    rows: Iterator[tuple[int, dict[str, Any]]] = (
        read_tsv(path, ()) if suffix == ".tsv" else read_csv(path) if suffix == ".csv" else read_jsonl(path))
    first = next(rows, None)
    if first is None:
        raise UserInputError(f"{path}:{1 if suffix == '.jsonl' else 2}: no data rows")
    if suffix == ".jsonl":  # the first object's keys say what the file holds; a header does in .tsv and .csv
        kind = _row_kind(path, first[0], list(first[1]), kinds, flag, "keys")
    else:
        kind = _row_kind(path, 1, list(first[1]), kinds, flag, "header")
    columns = ROW_KINDS[kind]
    if kind == "tuple":  # anchor, positive, negative_1 ... negative_n: n from the header or the first object
        names = list(first[1])
        columns = ("anchor", "positive", *itertools.takewhile(lambda c: c in names, (f"negative_{i}" for i in itertools.count(1))))

    def complete(items: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
        for line_no, row in items:  # .jsonl: every object must have the kind's keys (a header guarantees them)
            missing = next((column for column in columns if column not in row), None)
            if missing is not None:
                raise UserInputError(f"{path}:{line_no}: {missing}: missing key (the file holds {ROW_KIND_NAMES[kind]}: "
                                     f"{', '.join(columns)})")
            yield line_no, row

    items = complete(itertools.chain([first], rows))
    if kind == "nli":
        read = nli_pairs_from_rows(path, items)
        return OwnFile(path, kind, read.pairs, read.skipped_no_consensus)
    if kind == "scored":
        return OwnFile(path, kind, scored_pairs_from_rows(path, items, score_max))
    texts = [tuple(_sentence(path, line_no, row, column) for column in columns) for line_no, row in items]
    return OwnFile(path, kind, [Triplet(*t) for t in texts] if kind == "triplet" else texts)  # tuples: plain tuples


def read_scored_file(path: str | os.PathLike, flag: str, score_max: float = 5.0) -> list[StsPair]:
    """A scored-pair file (sentence1, sentence2, score) in any own format; label = score / score_max."""
    return read_own_file(path, SCORED_KINDS, flag, score_max).rows


def expand_file_list(spec: str, flag: str) -> list[Path]:
    """Comma-separated paths or globs, in the order given (a glob's matches sorted); a file named twice is read once."""
    files: dict[Path, Path] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if any(char in entry for char in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise UserInputError(f"{entry}: {flag}: no file matches")
        else:
            matches = [entry]
        for match in matches:
            files.setdefault(Path(match).resolve(), Path(match))
    if not files:
        raise UserInputError(f"{flag} {spec!r}: names no file")
    return list(files.values())


def sts_path(data_dir: str | os.PathLike, split: str, instead: str = "") -> Path:
    """data_dir's KorSTS file of `split`; `instead` names the flag that could give another file."""
    if split not in STS_SPLITS:
        raise UserInputError(f"--split {split!r}: expected one of {', '.join(STS_SPLITS)}")
    path = Path(data_dir) / "KorSTS" / STS_SPLITS[split]
    if not path.is_file():
        raise UserInputError(
            f"{path}: KorSTS {split} file not found (expected <data_dir>/KorSTS/{STS_SPLITS[split]}; "
            f"get it with `{KORNLU_CLONE}`"
            + (f", train offline on the copy shipped with kfdeb: --data_dir kfdeb:bundled, or pass {instead} with a "
               "file of scored pairs: sentence1, sentence2, score)" if instead else ")")
        )
    return path
