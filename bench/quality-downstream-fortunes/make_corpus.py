# Usage: .venv/bin/python bench/quality-downstream-fortunes/make_corpus.py runs/fortunes-corpus
# then: pretrain bench quality --corpus fortunes=runs/fortunes-corpus --variant softmax --variant learned_vmf --downstream softmax,learned_vmf --task fortunes
"""A pretraining corpus of every fortune file (Debian `fortunes`) minus the fortunes task's validation
entries: one entry per line in OUT/fortunes.txt."""
import json, sys, tempfile
from pathlib import Path
from pretrain.downstream.tasks import build_fortunes_task, read_fortunes, FORTUNES_DIR

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:  # the task's split, built as the study builds it
    build_fortunes_task(FORTUNES_DIR, Path(tmp))
    held = {json.loads(l)["text"] for l in (Path(tmp) / "valid.jsonl").read_text().splitlines()}
entries, dropped = [], 0
for f in sorted(FORTUNES_DIR.iterdir()):
    if f.suffix or not f.is_file() or f.is_symlink() or f.name == "ascii-art":  # pictures, not text
        continue
    for e in read_fortunes(f):
        if e in held:
            dropped += 1
        else:
            entries.append(e)
(out / "fortunes.txt").write_text("\n".join(entries) + "\n")
print(f"{len(entries)} entries, {dropped} held-out entries left out, {(out / 'fortunes.txt').stat().st_size} bytes")
