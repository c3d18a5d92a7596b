"""`pretrain bench quality`: the study's parts (scores, bootstrap, buckets, adaptive head) and a --small run."""
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pretrain.bench import quality
from pretrain.cli import main
from pretrain.config import REPO_ROOT
from pretrain.model.heads import AdaptiveSoftmaxHead, frequency_cutoffs


# Parts -------------------------------------------------------------------------------------------

def test_paired_bootstrap_interval_covers_the_difference_and_is_zero_for_identical_hits():
    rng = np.random.default_rng(0)
    reference = rng.random(2000) < 0.3
    same = quality.paired_bootstrap(reference, reference)
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0]}
    better = reference | (rng.random(2000) < 0.2)  # strictly more hits, on the same positions
    result = quality.paired_bootstrap(better, reference)
    assert result["diff"] == pytest.approx(better.mean() - reference.mean())
    assert 0 < result["ci95"][0] <= result["diff"] <= result["ci95"][1]


def test_buckets_are_the_top_1_percent_next_9_percent_and_rest_by_frequency():
    counts = np.arange(1000)[::-1].copy()  # id 0 most frequent
    bucket = quality.bucket_of_ids(counts)
    assert (bucket[:10] == 0).all() and (bucket[10:100] == 1).all() and (bucket[100:] == 2).all()


def test_score_counts_hub_predictions_against_the_true_share():
    counts = np.array([0, 0, 0, 0, 0, 100, 50, 10, 1])  # piece 5 is the most frequent
    targets = torch.tensor([5, 6, 7, 8])
    top5 = torch.tensor([[5, 6, 7, 8, 0]] * 4)  # always predicts piece 5 first
    s = quality.score(top5, targets, counts)
    assert s["top1"] == 0.25 and s["top5"] == 1.0
    assert s["most_frequent_predicted_share"] == 1.0 and s["most_frequent_true_share"] == 0.25
    assert s["top1_without_most_frequent"] == 0.0 and s["distinct_predicted"] == 1


def test_adaptive_head_log_probs_are_in_id_order_and_its_loss_is_their_nll():
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 100, 1, 50, 7, 3, 30, 2, 9, 60, 4])
    head = AdaptiveSoftmaxHead(8, counts, cutoffs=[3, 7])
    hidden, labels = torch.randn(20, 8), torch.randint(0, 12, (20,))
    log_probs = head(hidden)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(20))
    # The loss on ids must be the NLL of forward() at those ids: wrong id<->rank mapping would break it.
    nll = -log_probs.gather(1, labels[:, None]).mean()
    torch.testing.assert_close(head.loss(hidden, labels)["loss"], nll)
    # The most frequent id (2) sits in the head cluster: rank 0.
    assert int(head.rank_of_id[2]) == 0


def test_frequency_cutoffs_grow_and_stay_inside_the_vocabulary():
    counts = torch.tensor([1000, 500, 200, 100, 50, 20, 10, 5, 2, 1])
    cutoffs = frequency_cutoffs(counts)
    assert cutoffs == sorted(set(cutoffs)) and 1 < cutoffs[0] and cutoffs[-1] < len(counts)


def test_unknown_variant_and_missing_softmax_are_refused():
    with pytest.raises(ValueError, match="not a built-in"):
        quality.parse_variants(["softmax", "nonsense"])
    with pytest.raises(ValueError, match="softmax is the reference"):
        quality.parse_variants(["cosine"])
    with pytest.raises(FileNotFoundError, match="--corpus NAME=PATH"):
        quality.parse_corpora(["docs=/no/such/dir"])


def test_a_table_input_encoder_is_exported_for_fine_tuning_as_an_ordinary_one(tiny_targets, tmp_path):
    """model.input_embedding=targets: the downstream export folds the adapter into tok_emb, same hidden states."""
    from pretrain.downstream.export import load_encoder
    from pretrain.targets.table import load_target_table

    cfg = tiny_targets.model_copy(deep=True)
    cfg.model.input_embedding = "targets"
    table, _ = load_target_table(cfg.targets_path)
    model = quality.build_variant(cfg, [], table.shape[0], table, None, None).eval()
    exported, _ = load_encoder(quality.export_encoder(model, cfg, tmp_path / "export", str(cfg.targets_path)))
    assert exported.encoder.embed.input_table is None and exported.encoder.embed.tok_emb.weight.shape[0] == table.shape[0]
    ids = torch.randint(5, table.shape[0], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(ids), model.encode(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["learned_vmf_sparse", "adaptive_softmax_sparse", "learned_vmf"])
def test_the_study_trains_with_the_trainers_optimizer_and_sparse_variants_move_only_the_rows_read(tiny_targets, variant, monkeypatch):
    """quality.train uses pretrain.engine.optim.build_optimizer (the trainer's AdamW); the *_sparse
    variants get the lazy row update, so input-embedding rows (and learned-table rows) of pieces no
    batch held stay where they started, while a dense AdamW's weight decay moves every row."""
    from pretrain.engine import optim
    from pretrain.targets.table import load_target_table

    cfg = quality.variant_config(tiny_targets, quality.VARIANTS[variant])
    table, _ = load_target_table(cfg.targets_path)
    counts = np.arange(table.shape[0], 0, -1)
    model = quality.build_variant(cfg, quality.VARIANTS[variant], table.shape[0], table, counts, None)
    built, build = [], optim.build_optimizer
    monkeypatch.setattr(optim, "build_optimizer", lambda groups, tc: built.append(build(groups, tc)) or built[-1])
    tables = {"encoder.embed.tok_emb.weight": model.encoder.embed.tok_emb.weight}
    if model.learned_targets is not None:
        tables["learned_targets.weight"] = model.learned_targets.weight
    start = {name: weight.detach().clone() for name, weight in tables.items()}
    training = quality.train(model, cfg, 3)
    sparse = variant.endswith("_sparse")
    assert len(built) == 1 and isinstance(built[0], optim.RowSparseAdamW) == sparse
    for name, weight in tables.items():
        moved = int((weight != start[name]).any(dim=1).sum())
        if sparse:
            assert 0 < moved < weight.shape[0], name
        elif name == "encoder.embed.tok_emb.weight":  # (the dense learned table has no weight decay)
            assert moved == weight.shape[0]
    assert training["steps"] == 3 and training["cpu_s"] > 0 and training["first_step_cpu_s"] > 0


@pytest.mark.parametrize("progress", [True, False])
def test_the_studys_training_shows_a_progress_bar_named_for_the_run_unless_train_progress_is_off(tiny_targets, progress, capsys):
    """A downstream encoder's pretraining runs for half an hour on a CPU: the bar says which run and how far."""
    cfg = quality.variant_config(tiny_targets, [*quality.VARIANTS["softmax"], f"train.progress={str(progress).lower()}"])
    table = quality.target_table(cfg)
    model = quality.build_variant(cfg, quality.VARIANTS["softmax"], table.shape[0], table, None, None)
    quality.train(model, cfg, 3, desc="downstream encoder softmax")
    err = capsys.readouterr().err
    assert ("downstream encoder softmax" in err and "3/3" in err) == progress
    assert err.strip() == "" or progress


@pytest.mark.parametrize("planned", [4, 5, 12])
def test_a_cpu_budget_ends_training_when_spent_and_the_schedule_spans_it_whatever_was_planned(tiny_targets, planned, monkeypatch):
    """Equal time: a run with cpu_budget_s stops at the first step whose steady CPU time reaches the budget,
    and its learning rate follows the share of the budget spent (warm-up first, the floor at the end), not
    the planned steps: a plan from an earlier timing can be off. Each step costs 2 s of a fake CPU clock."""
    from pretrain.engine import schedule

    cfg = quality.variant_config(tiny_targets, [*quality.VARIANTS["softmax"], "train.warmup_steps=2", "train.min_lr_ratio=0.1"])
    table = quality.target_table(cfg)
    model = quality.build_variant(cfg, quality.VARIANTS["softmax"], table.shape[0], table, None, None)
    clock = [100.0]
    step_done = model.after_optimizer_step
    monkeypatch.setattr(model, "after_optimizer_step", lambda: (step_done(), clock.__setitem__(0, clock[0] + 2.0)))
    monkeypatch.setattr(quality.time, "process_time", lambda: clock[0])
    lrs = []
    set_lr = schedule.set_lr
    monkeypatch.setattr(schedule, "set_lr", lambda optimizer, lr: (lrs.append(lr), set_lr(optimizer, lr)))
    training = quality.train(model, cfg, planned, cpu_budget_s=13.0)
    # steady CPU after step k: (2k - 2) x k / (k - 1) = 2k; 2k >= 13 first at k = 7 (step 1 excluded, as in every row)
    assert training["steps"] == 7 and training["cpu_s"] == 14.0 and training["cpu_budget_s"] == 13.0
    assert training["planned_steps"] == planned
    base, floor = cfg.train.lr, cfg.train.lr * cfg.train.min_lr_ratio
    assert len(lrs) == 7 and lrs[0] < lrs[1] and max(lrs) == pytest.approx(base)  # warm-up, then the peak
    assert lrs[-1] == pytest.approx(floor)  # the budget's end is the schedule's end
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # decaying in between
    assert quality.train(model, cfg, planned, cpu_budget_s=13.0, max_steps=3)["steps"] == 3  # the cap
    assert quality.train(model, cfg, planned)["steps"] == planned  # no budget: the steps


def test_continuous_rows_are_compared_with_every_softmax_head_variant_and_those_with_softmax():
    rng = np.random.default_rng(0)
    names = {"softmax": "argmax", "adaptive_softmax": "argmax", "adaptive_softmax_sparse": "argmax",
             "learned_vmf": "nearest", "learned_vmf+csls": "csls"}
    rows = {n: {"variant": n, "base_variant": n.split("+")[0], "decoding": d} for n, d in names.items()}
    hits = {n: {k: rng.random(200) < 0.3 + 0.1 * i for k in ("top1", "top5")} for i, n in enumerate(names)}
    quality.compare_to_peers(rows, hits)
    assert quality.softmax_family(rows) == ["softmax", "adaptive_softmax", "adaptive_softmax_sparse"]
    assert {k for k in rows["adaptive_softmax_sparse"] if k.startswith("vs_")} == {"vs_softmax"}
    for name in ("learned_vmf", "learned_vmf+csls"):
        assert {k for k in rows[name] if k.startswith("vs_")} == {"vs_softmax", "vs_adaptive_softmax", "vs_adaptive_softmax_sparse"}
        diff = rows[name]["vs_adaptive_softmax_sparse"]["top1"]["diff"]
        assert diff == pytest.approx(hits[name]["top1"].mean() - hits["adaptive_softmax_sparse"]["top1"].mean())
    assert "softmax" not in rows["softmax"] and "vs_softmax" not in rows["softmax"]


def test_downstream_best_takes_every_softmax_head_variant_and_the_best_continuous_one():
    def row(name, decoding, top1):
        return {"variant": name, "base_variant": name.split("+")[0], "decoding": decoding, "top1": top1}

    equal_time = {r["variant"]: r for r in (
        row("softmax", "argmax", 0.10), row("adaptive_softmax", "argmax", 0.30), row("adaptive_softmax_sparse", "argmax", 0.31),
        row("learned_vmf", "nearest", 0.35), row("learned_vmf+csls", "csls", 0.50), row("learned_vmf_sparse", "nearest", 0.38),
        row("cosine", "nearest", 0.20))}
    # a hub-aware decoding's top-1 does not pick the encoder: the encoder is the same, only the search differs
    assert quality.downstream_choice("best", equal_time) == ["softmax", "adaptive_softmax", "adaptive_softmax_sparse", "learned_vmf_sparse"]
    assert quality.downstream_choice("none", equal_time) == []
    assert quality.downstream_choice("softmax,cosine", equal_time) == ["softmax", "cosine"]
    with pytest.raises(ValueError, match="unknown variants"):
        quality.downstream_choice("softmax,syn_margin", equal_time)


def test_downstream_budget_time_plans_each_encoders_steps_in_softmaxs_cpu_time():
    """--downstream-budget time plans steps x softmax's CPU s per step / the variant's (from the equal-token rows
    measured side by side), capped at max_factor x steps; the steps budget and 0 (the equal-time runs) pass through.
    (The runs stop on softmax's measured CPU time: test_a_cpu_budget_ends_training_...)"""
    equal_tokens = {name: {"training": {"steps": 300, "cpu_s": cpu}} for name, cpu in
                    (("softmax", 75.0), ("adaptive_softmax_sparse", 42.0), ("learned_vmf_sparse", 50.0), ("cosine", 10.0))}
    chosen = ["softmax", "adaptive_softmax_sparse", "learned_vmf_sparse", "cosine"]
    assert quality.downstream_steps(chosen, equal_tokens, 6000, "steps", 4.0) == dict.fromkeys(chosen, 6000)
    assert quality.downstream_steps(chosen, equal_tokens, 6000, "time", 4.0) == {
        "softmax": 6000, "adaptive_softmax_sparse": 10714, "learned_vmf_sparse": 9000, "cosine": 24000}  # 7.5x, capped at 4x
    assert quality.downstream_steps(chosen, equal_tokens, 0, "time", 4.0) == dict.fromkeys(chosen, 0)
    # the run measures softmax's CPU time first: without softmax there is no budget, and it says so before training
    with pytest.raises(ValueError, match="add softmax to --downstream"):
        quality.downstream_encoders(["cosine"], {}, None, {}, {"cosine": 6000}, None, {}, Path("unused"), budget="time")


def test_downstream_verdict_beats_only_when_the_gap_exceeds_the_larger_spread():
    def row(mean, spread):
        return {"mean": mean, "spread": spread}
    results = {"softmax": {"20": row(0.40, 0.05), "100": row(0.60, 0.02)},
               "learned_vmf": {"20": row(0.69, 0.01), "100": row(0.79, 0.02)},
               "cosine": {"20": row(0.50, 0.01), "100": row(0.70, 0.01)},
               "control: random init": {"20": row(0.59, 0.04), "100": row(0.725, 0.02)},
               "control: table embeddings, no pretraining": {"20": row(0.66, 0.012), "100": row(0.775, 0.011)},
               quality.TFIDF: {"20": row(0.90, 0.0), "100": row(0.95, 0.0)}}  # a reference, never the best encoder
    verdict = quality.downstream_verdict(results)
    assert verdict["encoder"] == "learned_vmf" and set(verdict["against"]) == {"softmax", "control: random init",
                                                                             "control: table embeddings, no pretraining"}
    assert verdict["against"]["control: table embeddings, no pretraining"]["20"]["beats"]  # 3 points > 1.2 spread
    assert not verdict["against"]["control: table embeddings, no pretraining"]["100"]["beats"]  # 1.5 points < 2 spread
    assert verdict["goal_met"] is False
    results["learned_vmf"]["100"] = row(0.80, 0.01)
    assert quality.downstream_verdict(results)["goal_met"] is True
    assert quality.downstream_verdict({k: v for k, v in results.items() if k in ("softmax", "control: random init")}) is None


# Downstream tasks --------------------------------------------------------------------------------

TOPIC_WORDS = {"computers": "kernel compiler bug byte program disk", "politics": "senate vote law party election tax",
               "science": "atom physics theory lab energy cell", "work": "boss office meeting salary job desk"}


def write_fortunes(root: Path, per_category: int = 36) -> Path:
    """Fortune files as Debian ships them: entries split by '%' lines, some overstruck, one shared entry."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for category, words in TOPIC_WORDS.items():
        entries = [" ".join(rng.choice(words.split(), 8)) + f"\n\t-- {category} {i}" for i in range(per_category)]
        entries[0] = "_\bu_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd " + entries[0]
        entries.append("The same quip in every file.")
        (root / category).write_text("\n%\n".join(entries) + "\n%\n")
    (root / "zippy").write_text("not one of the task's categories\n%\n")
    return root


def test_fortunes_task_splits_each_category_and_drops_what_two_categories_share(tmp_path):
    from pretrain.downstream import tasks
    from pretrain.downstream.classify import read_labelled

    source = write_fortunes(tmp_path / "fortunes")
    summary = tasks.build_fortunes_task(source, tmp_path / "task", valid_per_class=10)
    assert summary["ambiguous_dropped"] == 1
    train = read_labelled(tmp_path / "task" / "train.jsonl")
    valid = read_labelled(tmp_path / "task" / "valid.jsonl")
    assert sorted(set(train.labels)) == sorted(TOPIC_WORDS) == sorted(set(valid.labels))
    assert all(valid.labels.count(c) == 10 and train.labels.count(c) == 26 for c in TOPIC_WORDS)
    assert not set(train.texts) & set(valid.texts) and "The same quip in every file." not in train.texts + valid.texts
    assert any(t.startswith("underlined ") for t in train.texts + valid.texts)  # overstriking removed
    assert all("\x08" not in t and "\n" not in t for t in train.texts)
    # the same source gives the same split (the study is repeatable)
    tasks.build_fortunes_task(source, tmp_path / "again", valid_per_class=10)
    assert (tmp_path / "again" / "valid.jsonl").read_bytes() == (tmp_path / "task" / "valid.jsonl").read_bytes()


def test_task_specs_are_checked_before_any_training(tmp_path):
    from pretrain.downstream import tasks

    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        tasks.build_fortunes_task(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "computers").write_text("a\n%\nb\n%\nc\n")
    with pytest.raises(FileNotFoundError, match="partial/politics not found"):
        tasks.build_fortunes_task(tmp_path / "partial", tmp_path / "out")
    with pytest.raises(ValueError, match="not a built-in"):
        tasks.parse_tasks(["news"], tmp_path)
    with pytest.raises(FileNotFoundError, match="--task mine: .*missing.jsonl not found"):
        tasks.parse_tasks([f"mine={tmp_path / 'missing.jsonl'}"], tmp_path)
    shipped, own = tasks.parse_tasks(["wordnet-domains", f"own={REPO_ROOT / 'data' / 'finetune' / 'train.jsonl'}"], tmp_path)
    assert shipped.valid_file.name == "valid.jsonl" and own.valid_file is None
    with pytest.raises(ValueError, match="names repeat"):
        tasks.parse_tasks(["wordnet-domains", "wordnet-domains"], tmp_path)


# The --small study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """Two corpora of different kinds (WordNet glosses by line; this repo's markdown docs by paragraph),
    four variants, downstream with both controls, one seed."""
    tmp = tmp_path_factory.mktemp("quality")
    out = tmp / "bench" / "quality.json"
    fortunes = write_fortunes(tmp / "fortunes")
    argv = ["bench", "quality", "--small", "--corpus", f"wordnet={REPO_ROOT / 'data' / 'corpus'}",
            "--corpus", f"docs={REPO_ROOT / 'docs'}:blank_line", "--corpus-bytes", "150000",
            "--variant", "softmax", "--variant", "adaptive_softmax", "--variant", "cosine", "--variant", "learned_vmf",
            "--task", "wordnet-domains", "--task", f"quips={fortunes}", "--seeds", "1", "--downstream-budget", "time", "--workdir", str(tmp / "work"), "--out", str(out), "--track", "--store-dir", str(tmp / "mlruns")]
    assert main(argv) == 0
    return json.loads(out.read_text()), out.parent


def test_small_study_scores_every_variant_on_the_same_whole_validation_split(small_study):
    results, _ = small_study
    assert set(results["corpora"]) == {"wordnet", "docs"}
    docs = results["corpora"]["docs"]
    assert docs["doc_separator"] == "blank_line"
    for corpus in results["corpora"].values():
        for budget in ("equal_tokens", "equal_time"):
            rows = corpus["budgets"][budget]
            assert {"softmax", "adaptive_softmax", "cosine", "cosine+csls", "cosine+prior", "learned_vmf"} <= set(rows)
            assert {r["positions"] for r in rows.values()} == {corpus["valid_positions"]}
            for name, row in rows.items():
                assert 0 <= row["top1"] <= row["top5"] <= 1
                if name != "softmax":
                    low, high = row["vs_softmax"]["top1"]["ci95"]
                    assert low <= row["vs_softmax"]["top1"]["diff"] <= high
                # continuous rows are also compared with adaptive softmax on the same positions
                assert ("vs_adaptive_softmax" in row) == (row["base_variant"] not in ("softmax", "adaptive_softmax"))
                if "vs_adaptive_softmax" in row:
                    diff = row["vs_adaptive_softmax"]["top1"]["diff"]
                    assert diff == pytest.approx(row["top1"] - rows["adaptive_softmax"]["top1"], abs=1e-9)
        assert len(corpus["source"]["sha256"]) == 64 and corpus["source"]["files"] >= 1  # what text was measured
        # Equal tokens: every variant took the same number of steps.
        assert {r["training"]["steps"] for r in corpus["budgets"]["equal_tokens"].values()} == {results["steps"]}
        # Equal time: softmax's CPU time, each variant's run stopped when it was spent (or the equal-token run, within 5%)
        for row in corpus["budgets"]["equal_time"].values():
            training = row["training"]
            if row["base_variant"] != "softmax" and training["steps"] != results["steps"]:
                assert training["cpu_budget_s"] == pytest.approx(corpus["softmax_cpu_s"], abs=1e-3)
                assert training["cpu_s"] >= training["cpu_budget_s"] or training["steps"] == int(4.0 * results["steps"])


def test_small_study_fine_tunes_against_both_controls_and_writes_table_and_plots(small_study):
    results, out_dir = small_study
    tasks = results["corpora"]["wordnet"]["downstream"]["tasks"]
    assert list(tasks) == ["wordnet-domains", "quips"] and "docs" not in tasks  # downstream on the first corpus only
    assert "downstream" not in results["corpora"]["docs"]
    for task in tasks.values():
        ds = task["results"]
        assert {"softmax", "adaptive_softmax", "control: random init", "control: table embeddings, no pretraining"} <= set(ds)
        for by_budget in ds.values():
            assert set(by_budget) == {"20 per class", "100 per class"}
            assert all(0 <= b["mean"] <= 1 for b in by_budget.values())
        # the lexical reference: fitted once per budget and seed, on the same rows as the encoders
        assert all(len(b["accuracies"]) == results["corpora"]["wordnet"]["downstream"]["seeds"] for b in ds[quality.TFIDF].values())
        assert task["verdict"]["encoder"] not in (quality.TFIDF, "softmax", "adaptive_softmax")
    # each task fine-tunes on its own files: the quips runs read the built fortunes task
    quips_run = Path(results["corpora"]["wordnet"]["downstream"]["tasks"]["quips"]["train_file"])
    assert quips_run.parent.name == "quips" and "computers" in quips_run.read_text()
    table = (out_dir / quality.MARKDOWN).read_text()
    assert "### Downstream task wordnet-domains" in table and "### Downstream task quips" in table
    assert "## Corpus: wordnet" in table and "## Corpus: docs" in table and "cosine+csls" in table
    assert table.count("Text: ") == 2 and results["corpora"]["docs"]["source"]["sha256"][:16] in table
    assert "Δ vs adaptive softmax, paired 95% interval (points): cosine top-1 " in table
    # --downstream-steps (the --small default): the downstream encoders are pretrained by runs of their own,
    # not the equal-time runs (6 steps), and the table says so beside the fine-tuning recipe. With
    # --downstream-budget time softmax takes those steps and every other encoder its CPU time's worth.
    corpus = results["corpora"]["wordnet"]
    pretraining = corpus["downstream"]["pretraining"]
    steps = quality.SMALL["downstream_steps"]
    assert steps != results["steps"] and pretraining["softmax"]["steps"] == steps and "cpu_budget_s" not in pretraining["softmax"]
    planned = quality.downstream_steps(list(pretraining), corpus["budgets"]["equal_tokens"], steps, "time", 4.0)
    for v, t in pretraining.items():  # each other encoder trained until softmax's measured CPU time was spent
        if v != "softmax":
            assert t["cpu_budget_s"] == pytest.approx(pretraining["softmax"]["cpu_s"], abs=1e-3) and t["planned_steps"] == planned[v]
            assert t["cpu_s"] >= t["cpu_budget_s"] or t["steps"] == int(4.0 * steps)
    assert {"softmax", "adaptive_softmax"} < set(pretraining)  # and the best continuous variant
    assert corpus["downstream"]["budget"] == "time" and "equal process CPU time" in table
    assert f"softmax {steps} (" in table and "encoder_lr_scale" in table
    for plot in quality.PLOTS.values():
        assert (out_dir / plot).read_bytes()[:4] == b"\x89PNG"


def test_reuse_exports_fine_tunes_the_earlier_encoder_only_for_the_same_key(tmp_path, caplog):
    """--reuse-exports: a rerun with the same variant, steps and data fine-tunes the encoder the first run
    exported (its weights untouched, its pretraining record marked reused); other steps pretrain again."""
    out = tmp_path / "bench" / "quality.json"

    def study(*extra):
        argv = ["bench", "quality", "--small", "--corpus", f"wordnet={REPO_ROOT / 'data' / 'corpus'}", "--corpus-bytes", "60000",
                "--variant", "softmax", "--variant", "learned_vmf", "--downstream", "learned_vmf", "--task", "wordnet-domains",
                "--seeds", "1", "--workdir", str(tmp_path / "work"), "--out", str(out), *extra]
        assert main(argv) == 0
        return json.loads(out.read_text())["corpora"]["wordnet"]["downstream"]["pretraining"]["learned_vmf"]

    weights = tmp_path / "work" / "wordnet" / "exports" / "learned_vmf" / "model.safetensors"
    first = study("--reuse-exports")  # nothing to reuse yet
    assert "reused" not in first and first["steps"] == quality.SMALL["downstream_steps"]
    exported = (weights.read_bytes(), weights.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="pretrain.bench.quality"):
        again = study("--reuse-exports", "finetune.epochs=2")  # another fine-tuning recipe, the same encoder
    assert again["reused"] == str(weights.parent) and again["cpu_s"] == first["cpu_s"]
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == exported
    assert "reusing" in caplog.text and ", reused)" in (out.parent / quality.MARKDOWN).read_text()
    assert "reused" not in study("finetune.epochs=2")  # without the flag: pretrained again
    longer = study("--reuse-exports", "--downstream-steps", "10")
    assert "reused" not in longer and longer["steps"] == 10


def test_prepared_data_and_tables_are_reused_only_for_the_same_key(tmp_path):
    built = []
    stamp = tmp_path / "stamp.json"
    for key in ({"data": "a"}, {"data": "a"}, {"data": "b"}):  # "b": re-prepared data (another manifest)
        quality._stamped(stamp, key, lambda: built.append(1))
    assert len(built) == 2


def test_corpus_source_changes_with_the_text_and_names_the_debian_package(tmp_path, monkeypatch):
    """The study records what text it measured: a one-byte edit changes the digest (so prepared data
    are not reused for it), and a path a Debian package installed is named with the package's version."""
    (tmp_path / "a.txt").write_text("one line\n")
    (tmp_path / "b.txt").write_text("another\n")
    corpus = quality.Corpus("c", [str(tmp_path)], "line")
    first = quality.corpus_source(corpus)
    assert first["files"] == 2 and first["bytes"] == 17 and len(first["sha256"]) == 64
    assert quality.corpus_source(corpus) == first
    (tmp_path / "b.txt").write_text("anothe.\n")
    assert quality.corpus_source(corpus)["sha256"] != first["sha256"]
    calls = []

    def fake_dpkg(argv, **kwargs):
        calls.append(argv)
        out = f"fake-doc: {argv[-1]}\n" if argv[1] == "-S" else "1.2-3"
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")

    monkeypatch.setattr(quality.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(quality.subprocess, "run", fake_dpkg)
    assert quality.corpus_source(corpus)["debian_packages"] == {"fake-doc": "1.2-3"}
    assert [c[:2] for c in calls] == [["dpkg-query", "-S"], ["dpkg-query", "-W"]]


def test_small_study_is_logged_to_mlflow_with_its_table_and_plots(small_study):
    results, out_dir = small_study
    store = out_dir.parent / "mlruns"
    client = MlflowClient(f"sqlite:///{store.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("pretrain-bench")
    (run,) = client.search_runs([experiment.experiment_id])
    softmax_top1 = results["corpora"]["wordnet"]["budgets"]["equal_time"]["softmax"]["top1"]
    assert run.data.metrics["quality.corpora.wordnet.budgets.equal_time.softmax.top1"] == pytest.approx(softmax_top1)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "bench")}
    assert {f"bench/{quality.MARKDOWN}", "bench/quality.json", *(f"bench/{p}" for p in quality.PLOTS.values())} <= artifacts


def test_variant_overrides_parse_as_the_command_lines_do():
    from pretrain.config import ConfigError, load_config

    base = load_config(None, [])
    cfg = quality.variant_config(base, ["model.head=continuous", "loss.kappa_scale_start=0.1", "targets.dim=128",
                                        "targets.learned=true", "train.lr=3e-4", "adaptive"])
    assert (cfg.model.head, cfg.loss.kappa_scale_start, cfg.targets.dim, cfg.targets.learned, cfg.train.lr) == \
        ("continuous", 0.1, 128, True, 3e-4)
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        quality.variant_config(base, ["model.head"])
    with pytest.raises(ConfigError, match="no_such_key"):
        quality.variant_config(base, ["model.no_such_key=1"])
