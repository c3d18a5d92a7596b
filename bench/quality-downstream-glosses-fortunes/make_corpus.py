# Usage: .venv/bin/python bench/quality-downstream-glosses-fortunes/make_corpus.py runs/glosses-fortunes-corpus
# then: pretrain bench quality --corpus glosses+fortunes=runs/glosses-fortunes-corpus/glosses_and_fortunes.txt --corpus-bytes 0
#         --variant softmax --variant learned_vmf_sparse --downstream learned_vmf_sparse --downstream-steps 12000
#         --task wordnet-domains --task fortunes data.valid_fraction=0.05 finetune.epochs=20 train.seed=N
"""A pretraining corpus larger than either and closer to the fortunes task: the WordNet glosses as `pretrain bench
quality` takes them by default (its truncated_corpus: the first 4,000,000 bytes, whole lines) followed by every
fortune minus the fortunes task's validation entries (../quality-downstream-fortunes/make_corpus.py); one document per line."""
import runpy, sys, tempfile
from pathlib import Path
from pretrain.bench.quality import STUDY, Corpus, truncated_corpus

here = Path(__file__).resolve().parent
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    sys.argv = ["make_corpus.py", tmp]
    runpy.run_path(str(here.parent / "quality-downstream-fortunes" / "make_corpus.py"), run_name="__main__")
    fortunes = (Path(tmp) / "fortunes.txt").read_bytes()
    wordnet = Corpus("wordnet", [str(here.parents[1] / "data" / "corpus")], "line")
    glosses = Path(truncated_corpus(wordnet, STUDY["bytes"], Path(tmp))[0]).read_bytes()
(out / "glosses_and_fortunes.txt").write_bytes(glosses + fortunes)
print(f"{len(glosses)} bytes of glosses + {len(fortunes)} bytes of fortunes -> {out / 'glosses_and_fortunes.txt'}")
