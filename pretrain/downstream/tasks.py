"""Labelled tasks for `pretrain bench quality`'s downstream study: name -> (train file, valid file).

  wordnet-domains  the shipped WordNet lexical-domain task (data/finetune): its glosses are also in the
                   WordNet pretraining corpus, so it is not held-out text;
  fortunes         topic of a fortune cookie (computers / politics / science / work), built from Debian's
                   `fortunes` package (BSD fortune(6) data, /usr/share/games/fortunes; `make system-deps`):
                   short quips, jokes and quotations that neither pretraining corpus contains;
  NAME=TRAIN[,VALID]  your own CSV/TSV/JSONL files (no VALID: finetune.valid_fraction is held out);
  NAME=DIR         a directory of fortune files (strfile text, entries separated by '%' lines).
"""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import REPO_ROOT

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Four topical files with 600-1000 entries each (the others are forms - definitions, poems - or small).
FORTUNE_CATEGORIES = ("computers", "politics", "science", "work")
VALID_PER_CLASS = 200  # as the WordNet task: 800 validation rows over 4 classes
SPLIT_SEED = 0
SHIPPED = {"wordnet-domains": (REPO_ROOT / "data" / "finetune" / "train.jsonl", REPO_ROOT / "data" / "finetune" / "valid.jsonl")}
DEFAULT_TASKS = ["wordnet-domains", "fortunes"]
OVERSTRIKE = re.compile(".\x08")  # "_\bX" underlines X in the old terminal files


@dataclass
class Task:
    name: str
    train_file: Path
    valid_file: Path | None  # None: finetune.valid_fraction of the training rows is held out
    source: str

    def as_dict(self) -> dict:
        return {"train_file": str(self.train_file), "valid_file": str(self.valid_file) if self.valid_file else None,
                "source": self.source}


def read_fortunes(path: Path) -> list[str]:
    """The entries of one fortune file, whitespace collapsed, overstriking removed; empty entries dropped."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    entries = [" ".join(OVERSTRIKE.sub("", chunk).split()) for chunk in re.split(r"^%[ \t]*$", text, flags=re.M)]
    return [e for e in entries if e]


def build_fortunes_task(source_dir: Path, out_dir: Path, categories=FORTUNE_CATEGORIES, valid_per_class: int = VALID_PER_CLASS) -> dict:
    """train.jsonl / valid.jsonl in out_dir: every category file's entries, label = the file's name; a
    seeded shuffle per category holds out min(valid_per_class, a third) of them. An entry found in two of
    the categories is dropped from both (its label is ambiguous) and counted. Returns the counts."""
    if not source_dir.is_dir():
        raise FileNotFoundError(f"fortunes task: {source_dir} not found; install Debian's `fortunes` package "
                                "(`make system-deps` or `apt-get install fortunes`), or leave it out with --task wordnet-domains")
    by_label = {}
    for category in categories:
        path = source_dir / category
        if not path.is_file():
            raise FileNotFoundError(f"fortunes task: {path} not found; the task needs the files {', '.join(categories)} in {source_dir}")
        by_label[category] = read_fortunes(path)
        if len(by_label[category]) < 3:
            raise ValueError(f"fortunes task: {path} holds {len(by_label[category])} entries; need at least 3 to split")
    seen: dict[str, set] = {}
    for category, entries in by_label.items():
        for entry in entries:
            seen.setdefault(entry, set()).add(category)
    ambiguous = {e for e, cats in seen.items() if len(cats) > 1}
    rng = random.Random(SPLIT_SEED)
    train, valid, counts = [], [], {}
    for category, entries in by_label.items():
        kept = list(dict.fromkeys(e for e in entries if e not in ambiguous))  # a repeat within a file counts once
        rng.shuffle(kept)
        held = min(valid_per_class, len(kept) // 3)
        valid += [{"text": t, "label": category} for t in kept[:held]]
        train += [{"text": t, "label": category} for t in kept[held:]]
        counts[category] = {"entries": len(entries), "train": len(kept) - held, "valid": held}
    rng.shuffle(train)  # balanced_head takes the first rows of each label: a random sample of them
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("valid", valid)):
        (out_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if ambiguous:
        log.warning("fortunes task: %d entries appear under two or more of %s and were left out", len(ambiguous), list(categories))
    return {"categories": counts, "ambiguous_dropped": len(ambiguous)}


def parse_tasks(specs: list[str] | None, workdir: Path) -> list[Task]:
    """--task values -> tasks with their files (the fortunes task is built into workdir/tasks/NAME)."""
    tasks = []
    for spec in specs or DEFAULT_TASKS:
        name, sep, where = spec.partition("=")
        if not sep:
            if name in SHIPPED:
                train, valid = SHIPPED[name]
                tasks.append(Task(name, train, valid, "shipped (data/finetune, WordNet 3.0)"))
                continue
            if name != "fortunes":
                raise ValueError(f"--task {spec!r}: not a built-in ({', '.join([*SHIPPED, 'fortunes'])}); "
                                 "give NAME=TRAIN[,VALID] (CSV/TSV/JSONL) or NAME=DIR (fortune files)")
            where = str(FORTUNES_DIR)
        path = Path(where.split(",")[0])
        if path.is_dir() or (name == "fortunes" and not sep):
            out = workdir / "tasks" / name
            summary = build_fortunes_task(path, out)
            log.info("task %s: built from %s: %s", name, path, summary)
            tasks.append(Task(name, out / "train.jsonl", out / "valid.jsonl", f"fortune files in {path}: {summary}"))
            continue
        train, _, valid = where.partition(",")
        for file in filter(None, (train, valid)):
            if not Path(file).is_file():
                raise FileNotFoundError(f"--task {name}: {file} not found; give NAME=TRAIN[,VALID] with existing CSV/TSV/JSONL files")
        tasks.append(Task(name, Path(train), Path(valid) if valid else None, "given files"))
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"--task: names repeat in {specs}; give each task its own NAME")
    return tasks
