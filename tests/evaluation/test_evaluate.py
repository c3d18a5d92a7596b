"""evaluate(): metrics of small in-process trained models against a direct brute-force computation."""
import copy
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import config_from_dict
from pretrain.evaluation.decoder import IndexParams, NearestNeighbourDecoder
from pretrain.evaluation.evaluate import SUM_KEYS, all_reduce_totals, corrupt_per_sequence, evaluate
from pretrain.model import IGNORE_INDEX, batch_generator, build_model

VOCAB, LENGTH, DIM = 64, 16, 16


def progression_batches(count: int, batch_size: int, seed: int) -> list[dict]:
    """Arithmetic progressions over the ordinary ids 5..63: a masked piece follows from its neighbours."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        start = torch.randint(0, VOCAB - 5, (batch_size, 1), generator=g)
        step = torch.randint(1, 3, (batch_size, 1), generator=g)
        ids = 5 + (start + step * torch.arange(LENGTH)) % (VOCAB - 5)
        out.append({"input_ids": ids, "doc_ids": torch.zeros_like(ids)})
    return out


def train_tiny(head: str, steps: int = 200):
    torch.manual_seed(0)
    cfg = config_from_dict({
        "model": {"head": head, "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": LENGTH, "mask_prob": 0.3},
        "loss": {"name": "cosine", "impl": "reference"},
        "targets": {"dim": DIM},
    })
    table = F.normalize(torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    model = build_model(cfg, VOCAB, target_table=table if head == "continuous" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step, batch in enumerate(progression_batches(steps, 32, seed=0)):
        loss = model(batch, batch_generator(0, step, 0, 0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {head: train_tiny(head) for head in ("continuous", "softmax")}


@pytest.fixture(scope="module")
def valid_batches():
    return progression_batches(8, 32, seed=99)  # other sequences than training


@torch.no_grad()
def direct_metrics(model, batches, seed=0):
    """Independent path: full predict() over every position, brute-force cosine matmul / logits."""
    hits1 = hits5 = tokens = 0
    cos_sum = nll_sum = loss_sum = 0.0
    all_targets = []
    for raw in batches:
        batch = corrupt_per_sequence(model.objective, raw, seed)
        outputs = model.predict(batch["input_ids"], batch["doc_ids"])
        chosen = batch["labels"] != IGNORE_INDEX
        pred, target = outputs[chosen], batch["labels"][chosen]
        if model.continuous:
            scores = F.normalize(pred, dim=-1) @ F.normalize(model.target_table, dim=-1).T
            cos_sum += float(F.cosine_similarity(pred, model.target_table[target], dim=-1).sum())
        else:
            scores = pred
            nll_sum += float(F.cross_entropy(pred, target, reduction="sum"))
        top5 = scores.topk(5, dim=-1).indices
        hits1 += int((top5[:, 0] == target).sum())
        hits5 += int((top5 == target[:, None]).any(dim=1).sum())
        loss_sum += float(model(batch)["loss"]) * len(target)  # the training loss, as the engine computes it
        tokens += len(target)
        all_targets.append(target)
    majority = int(torch.cat(all_targets).bincount().max()) / tokens
    return {"majority_top1": majority, "top1": hits1 / tokens, "top5": hits5 / tokens, "tokens": tokens, "loss": loss_sum / tokens,
            "mean_cosine": cos_sum / tokens, "nll": nll_sum / tokens}


def test_continuous_head_matches_direct_computation(models, valid_batches):
    model = models["continuous"]
    result = evaluate(model, valid_batches, decoder=NearestNeighbourDecoder(model.target_table, device="cpu"))
    want = direct_metrics(model, valid_batches)
    m = result.metrics
    assert m["tokens"] == want["tokens"] and m["batches"] == 8 and m["sequences"] == 256
    assert m["top1"] == pytest.approx(want["top1"], abs=1e-9) and m["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert m["mean_cosine"] == pytest.approx(want["mean_cosine"], rel=1e-5)
    assert m["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert m["majority_top1"] == pytest.approx(want["majority_top1"]) and m["top1"] > m["majority_top1"]
    # Trained for 200 steps: far above chance (1/64); measured top-1 ~0.40, top-5 ~0.75.
    assert m["chance_top1"] == 1 / VOCAB and m["top1"] > 10 * m["chance_top1"] and m["top5"] > 0.5
    assert m["decode"]["vectors"] == m["tokens"] and m["decode"]["vectors_per_s"] > 0
    assert m["decode"]["placement"] == "cpu" and "recall_against_exact" not in m["decode"]


def test_softmax_head_matches_direct_computation(models, valid_batches):
    model = models["softmax"]
    m = evaluate(model, valid_batches).metrics
    want = direct_metrics(model, valid_batches)
    assert m["decoding"] == "argmax" and m["tokens"] == want["tokens"]
    assert m["top1"] == pytest.approx(want["top1"], abs=1e-9) and m["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert m["perplexity"] == pytest.approx(math.exp(want["nll"]), rel=1e-5)
    assert m["loss"] == pytest.approx(want["nll"], rel=1e-5)  # the softmax head's training loss is the NLL
    assert m["top1"] > 10 * m["chance_top1"] and m["perplexity"] < VOCAB / 4


def test_both_heads_are_scored_on_the_same_masked_positions(models, valid_batches):
    cont = evaluate(models["continuous"], valid_batches, decoder=NearestNeighbourDecoder(models["continuous"].target_table, device="cpu"),
                    num_examples=40, seed=7)
    soft = evaluate(models["softmax"], valid_batches, num_examples=40, seed=7)
    assert len(cont.examples) == len(soft.examples) == 40  # spans two batches of 32
    for (in_c, lab_c, _), (in_s, lab_s, _) in zip(cont.examples, soft.examples):
        assert torch.equal(in_c, in_s) and torch.equal(lab_c, lab_s)
    assert cont.metrics["tokens"] == soft.metrics["tokens"]
    other_seed = evaluate(models["softmax"], valid_batches, num_examples=1, seed=8)
    assert not torch.equal(other_seed.examples[0][1], soft.examples[0][1])


def test_masks_depend_on_the_sequence_not_on_batching(models, valid_batches):
    objective = models["softmax"].objective
    whole = corrupt_per_sequence(objective, valid_batches[0], seed=3)
    halves = [corrupt_per_sequence(objective, {k: v[part] for k, v in valid_batches[0].items()}, seed=3)
              for part in (slice(0, 5), slice(5, None))]
    for key in ("input_ids", "labels"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    chosen = whole["labels"] != IGNORE_INDEX
    assert 0.2 < chosen.float().mean() < 0.4  # model.mask_prob = 0.3
    assert torch.equal(whole["labels"][chosen], valid_batches[0]["input_ids"][chosen])
    other = corrupt_per_sequence(objective, valid_batches[0], seed=4)
    assert not torch.equal(other["labels"], whole["labels"])


def test_examples_carry_the_top1_prediction_at_target_positions(models, valid_batches):
    model = models["softmax"]
    result = evaluate(model, valid_batches[:1], num_examples=3)
    batch = corrupt_per_sequence(model.objective, valid_batches[0], 0)
    logits = model.predict(batch["input_ids"], batch["doc_ids"])
    for row, (inputs, labels, predicted) in enumerate(result.examples):
        assert torch.equal(inputs, batch["input_ids"][row]) and torch.equal(labels, batch["labels"][row])
        chosen = labels != IGNORE_INDEX
        assert torch.equal(predicted[chosen], logits[row][chosen].argmax(-1))
        assert (predicted[~chosen] == IGNORE_INDEX).all()


def test_max_batches_and_topk(models, valid_batches):
    model = models["softmax"]
    m = evaluate(model, valid_batches, max_batches=3, topk=10).metrics
    assert m["batches"] == 3 and m["top5"] <= m["top10"] <= 1.0
    m3 = evaluate(model, valid_batches, max_batches=3, topk=3).metrics
    assert m3["top1"] <= m3["top3"] <= m3["top5"] == m["top5"] and m3["top3"] < m3["top5"]


def test_approximate_index_reports_recall(models, valid_batches):
    model = models["continuous"]
    exhaustive = NearestNeighbourDecoder(model.target_table, index="ivf", device="cpu", params=IndexParams(ivf_nlist=1, ivf_nprobe=1))
    m = evaluate(model, valid_batches, decoder=exhaustive).metrics
    recall = m["decode"]["recall_against_exact"]
    assert recall["queries"] == m["tokens"] and recall["recall@1"] == recall["recall@5"] == 1.0
    assert m["top1"] == pytest.approx(direct_metrics(model, valid_batches)["top1"])
    hnsw = NearestNeighbourDecoder(model.target_table, index="hnsw", device="cpu", params=IndexParams(hnsw_m=4, hnsw_ef_search=5))
    r = evaluate(model, valid_batches, decoder=hnsw, recall_queries=100).metrics["decode"]["recall_against_exact"]
    assert r["queries"] == 100 and 0.0 < r["recall@5"] <= 1.0


def test_bad_inputs(models):
    padding_only = [{"input_ids": torch.zeros(2, LENGTH, dtype=torch.long), "doc_ids": torch.full((2, LENGTH), -1)}]
    with pytest.raises(ValueError, match="no target positions in 1 validation batches"):
        evaluate(models["softmax"], padding_only)
    with pytest.raises(ValueError, match="needs a NearestNeighbourDecoder"):
        evaluate(models["continuous"], padding_only)
    diverged = copy.deepcopy(models["softmax"])
    with torch.no_grad():
        diverged.head.proj.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf outputs on validation data"):
        evaluate(diverged, progression_batches(1, 4, seed=5))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_rank_worker(rank: int, port: int, model, batches, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        counters, histogram = all_reduce_totals({key: float(rank + 1) for key in SUM_KEYS}, torch.arange(3) * (rank + 1))
        # Uneven shares (3 batches vs 1): the single all-reduce at the end must not hang.
        merged = evaluate(model, batches[:3] if rank == 0 else batches[3:4]).metrics
        queue.put((rank, counters["tokens"], histogram.tolist(), merged))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_give_the_single_process_metrics(models, valid_batches):
    import torch.multiprocessing as mp

    model = models["softmax"]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_two_rank_worker, args=(_free_port(), model, valid_batches, queue), nprocs=2, start_method="spawn")
    records = [queue.get() for _ in range(2)]
    single = evaluate(model, valid_batches[:4]).metrics
    for rank, counter_sum, histogram, merged in records:
        assert counter_sum == 1.0 + 2.0 and histogram == [0.0, 3.0, 6.0]
        assert merged["batches"] == 4 and merged["tokens"] == single["tokens"]
        assert merged["top1"] == pytest.approx(single["top1"]) and merged["top5"] == pytest.approx(single["top5"])
        assert merged["perplexity"] == pytest.approx(single["perplexity"], rel=1e-9)
        assert merged["majority_top1"] == pytest.approx(single["majority_top1"])
