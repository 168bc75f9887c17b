"""Write the chatbot retrieval sets from Chatbot_data_for_Korean (kfdeb.held_out.chatbot_sets explains the split).

    python bench/build_chatbot_sets.py [PATH/TO/chatbot-qa]     (default: ../shared/data/chatbot-qa)

Reads ChatbotData.csv (Q, A, label; Youngsook Song 2018, MIT) and writes, deterministically:
    kfdeb/bundled/retrieval/chatbot-test/   BEIR folder, split test: held-out questions -> all distinct answers
                                            (+ sources.json, LICENSE)
    examples/data/chatbot_train_pairs.jsonl anchor (question), positive (answer): training pairs
    examples/data/dev_pairs.jsonl           the same kind: a small dev slice, no question or answer of the others
    examples/data/LICENSE-chatbot-data      the data's MIT licence, beside the two files derived from it
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kfdeb.held_out import chatbot_sets  # noqa: E402
from kfdeb.ir_data import BUNDLED_RETRIEVAL_DIR, SOURCES_FILE, write_beir  # noqa: E402


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text("".join(json.dumps({"anchor": q, "positive": a}, ensure_ascii=False) + "\n" for q, a in pairs),
                    encoding="utf-8")


def main(source: Path) -> None:
    csv_path = source / "ChatbotData.csv"
    with open(csv_path, encoding="utf-8", newline="") as handle:
        pairs = [(row["Q"], row["A"]) for row in csv.DictReader(handle)]
    test, dev, train = chatbot_sets(pairs)
    folder = BUNDLED_RETRIEVAL_DIR / "chatbot-test"
    shutil.rmtree(folder, ignore_errors=True)
    write_beir(test, folder, "test")
    digest = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    (folder / SOURCES_FILE).write_text(json.dumps({digest: csv_path.name}) + "\n", encoding="utf-8")
    shutil.copyfile(source / "LICENSE", folder / "LICENSE")
    write_pairs(REPO / "examples" / "data" / "chatbot_train_pairs.jsonl", train)
    write_pairs(REPO / "examples" / "data" / "dev_pairs.jsonl", dev)
    shutil.copyfile(source / "LICENSE", REPO / "examples" / "data" / "LICENSE-chatbot-data")
    print(f"{len(set(pairs))} distinct pairs: test {len(test.queries)} questions over {len(test.corpus)} answers, "
          f"dev {len(dev)} pairs, train {len(train)} pairs")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data" / "chatbot-qa")
