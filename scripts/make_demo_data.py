"""Rebuild the embedded demo data from Debian's `wordnet-base` package (WordNet 3.0).

    apt-get install wordnet-base && python scripts/make_demo_data.py

Writes data/corpus/wordnet_glosses.txt.gz (pretraining corpus: one synset per line,
"lemmas: gloss; examples") and data/finetune/{train,valid}.jsonl (gloss -> lexical domain,
a 4-class labelled task). License: WordNet 3.0 license, see data/LICENSE-WordNet.
"""
import gzip
import json
import random
import re
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parents[1] / "data"
# lexicographer file numbers (WordNet lexnames) of the fine-tuning classes
DOMAINS = {5: "animal", 20: "plant", 13: "food", 18: "person"}


def synsets():
    for pos in ["noun", "verb", "adj", "adv"]:
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n_words)]
            yield pos, int(fields[1]), words, gloss.strip()


def main():
    rows = list(synsets())
    (OUT / "corpus").mkdir(parents=True, exist_ok=True)
    # mtime=0: the archive is byte-identical on every rebuild
    with open(OUT / "corpus" / "wordnet_glosses.txt.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for _, _, words, gloss in rows:
            f.write(f"{', '.join(words)}: {gloss}\n".encode())
    rng = random.Random(0)
    by_label = {name: [] for name in DOMAINS.values()}
    for pos, lexfile, _, gloss in rows:
        if pos == "noun" and lexfile in DOMAINS:
            # only the definition, without the lemma, so the label must be inferred from the text
            by_label[DOMAINS[lexfile]].append(gloss.split(";")[0].strip())
    train, valid = [], []
    for label, texts in sorted(by_label.items()):
        rng.shuffle(texts)
        train += [{"text": t, "label": label} for t in texts[:800]]
        valid += [{"text": t, "label": label} for t in texts[800:1000]]
    rng.shuffle(train)
    rng.shuffle(valid)
    (OUT / "finetune").mkdir(parents=True, exist_ok=True)
    for name, data in [("train", train), ("valid", valid)]:
        with open(OUT / "finetune" / f"{name}.jsonl", "w") as f:
            for row in data:
                f.write(json.dumps(row) + "\n")
    print(f"{len(rows)} synsets; finetune train={len(train)} valid={len(valid)}")


if __name__ == "__main__":
    main()
