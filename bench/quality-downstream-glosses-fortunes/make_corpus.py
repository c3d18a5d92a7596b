# Usage: .venv/bin/python bench/quality-downstream-glosses-fortunes/make_corpus.py runs/glosses-fortunes-corpus
# then: pretrain bench quality --corpus glosses+fortunes=runs/glosses-fortunes-corpus/glosses_and_fortunes.txt --corpus-bytes 0
#         --variant softmax --variant learned_vmf_sparse --downstream learned_vmf_sparse --downstream-steps 12000
#         --task wordnet-domains --task fortunes data.valid_fraction=0.05 finetune.epochs=20 train.seed=N
"""A pretraining corpus larger than either and closer to the fortunes task: the first 4,000,000 bytes of the
WordNet glosses (whole lines, what `pretrain bench quality` takes of them by default) followed by every fortune
minus the fortunes task's validation entries (../quality-downstream-fortunes/make_corpus.py); one document per line."""
import gzip, runpy, sys, tempfile
from pathlib import Path

here = Path(__file__).resolve().parent
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    sys.argv = ["make_corpus.py", tmp]
    runpy.run_path(str(here.parent / "quality-downstream-fortunes" / "make_corpus.py"), run_name="__main__")
    fortunes = (Path(tmp) / "fortunes.txt").read_bytes()
glosses = gzip.decompress((here.parents[1] / "data" / "corpus" / "wordnet_glosses.txt.gz").read_bytes())[:4_000_000]
glosses = glosses[: glosses.rfind(b"\n") + 1]
(out / "glosses_and_fortunes.txt").write_bytes(glosses + fortunes)
print(f"{len(glosses)} bytes of glosses + {len(fortunes)} bytes of fortunes -> {out / 'glosses_and_fortunes.txt'}")
