"""Learned targets: naive cosine to a trainable table collapses; the remedies keep it spread and useful."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import TargetsConfig
from pretrain.targets import diagnostics as diag
from pretrain.targets.learned import LearnedTargets, vicreg_penalty
from pretrain.targets.table import random_unit_table

V, D, SUCCESSORS, HIDDEN, STEPS = 128, 16, 4, 64, 300


def train_synthetic(remedy: str, steps: int = STEPS, seed: int = 0) -> dict:
    """Next-token task with 4 equally likely successors per token: the best prediction is an average
    of several rows, which is what pulls a naively trained table together."""
    torch.manual_seed(seed)
    successors = torch.randint(0, V, (V, SUCCESSORS))
    model = nn.Sequential(nn.Embedding(V, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D))
    targets = LearnedTargets(random_unit_table(V, D, seed + 1), remedy, negatives=32)
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *targets.param_groups(1e-2)], lr=1e-2)

    def hit_rate() -> float:  # nearest row of each token's prediction is one of its successors
        with torch.no_grad():
            nearest = (F.normalize(model(torch.arange(V)), dim=-1) @ targets.table_for_decoding().T).argmax(-1)
        return (successors == nearest[:, None]).any(1).float().mean().item()

    before = {"hit_rate": hit_rate(), **targets.diagnostics()}
    for _ in range(steps):
        x = torch.randint(0, V, (256,))
        y = successors[x, torch.randint(0, SUCCESSORS, (256,))]
        pred = model(x)
        loss = (1 - F.cosine_similarity(pred, targets.table_for_loss()[y], dim=-1)).mean() + targets.extra_loss(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        targets.after_step()
    return {"before": before, "after": {"hit_rate": hit_rate(), **targets.diagnostics()}}


@pytest.fixture(scope="module")
def runs():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny loop: one thread is ~30x faster than two fighting over shared cores
    try:
        return {remedy: train_synthetic(remedy) for remedy in ("none", "contrastive", "vicreg", "ema")}
    finally:
        torch.set_num_threads(before)


def test_naive_learned_targets_collapse(runs):
    run = runs["none"]
    assert run["before"]["targets/effective_rank"] > 15  # a random 128 x 16 table
    # Measured: effective rank 15.7 -> 1.5, mean cosine 0.00 -> 1.00.
    assert run["after"]["targets/effective_rank"] < 2.0
    assert run["after"]["targets/mean_cos"] > 0.99


@pytest.mark.parametrize("remedy", ["contrastive", "vicreg"])
def test_remedy_keeps_rank_and_the_model_learns(runs, remedy):
    run = runs[remedy]
    chance = SUCCESSORS / V
    assert run["before"]["hit_rate"] < 4 * chance
    # Measured: effective rank 15.8 / 15.9, mean cosine 0.002 / 0.04, hit rate 1.0 for both.
    assert run["after"]["targets/effective_rank"] > D / 2
    assert run["after"]["targets/mean_cos"] < 0.2
    assert run["after"]["targets/self_retrieval"] == 1.0
    assert run["after"]["hit_rate"] > 0.9


def test_ema_only_slows_the_collapse(runs):
    # Measured at 300 steps: rank 11.0 (naive 1.5); it keeps falling (5.1 at 600, 1.8 at 1200 steps).
    ema, naive = runs["ema"]["after"], runs["none"]["after"]
    assert ema["targets/effective_rank"] > naive["targets/effective_rank"] + 3
    assert ema["targets/effective_rank"] < runs["ema"]["before"]["targets/effective_rank"] - 2


def test_contrastive_term_matches_reference():
    torch.manual_seed(0)
    lt = LearnedTargets(torch.randn(10, 4), "contrastive", negatives=0, temperature=0.5, contrastive_weight=2.0)
    pred = torch.randn(2, 3, 4, requires_grad=True)
    ids = torch.tensor([[7, 2, -100], [2, 9, 7]])
    loss = lt.extra_loss(pred, ids)
    keep = ids.reshape(-1) != -100
    p, y = F.normalize(pred.reshape(-1, 4)[keep], dim=-1), ids.reshape(-1)[keep]
    candidates = torch.tensor([2, 7, 9])
    logits = p @ F.normalize(lt.weight[candidates], dim=-1).T / 0.5
    expected = 2.0 * F.cross_entropy(logits, torch.tensor([1, 0, 0, 2, 1]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert lt.weight.grad[[2, 7, 9]].abs().sum() > 0 and lt.weight.grad[[0, 1, 3]].abs().sum() == 0


def test_sampled_negatives_get_gradient():
    torch.manual_seed(0)
    lt = LearnedTargets(torch.randn(1000, 4), "contrastive", negatives=64)
    lt.extra_loss(torch.randn(5, 4), torch.tensor([1, 2, 3, 4, 5])).backward()
    touched = (lt.weight.grad.abs().sum(1) > 0).sum().item()
    assert 5 + 50 <= touched <= 5 + 64


@pytest.mark.parametrize("remedy", ["contrastive", "vicreg", "none", "ema"])
def test_rows_for_loss_read_like_the_whole_normalised_table(remedy):
    """rows_for_loss(ids) normalises only the distinct rows the loss reads and renumbers ids into
    them: what a loss gathers, and its gradient (repeated and ignored ids included), must equal what
    it gathers from the whole table."""
    torch.manual_seed(0)
    lt = LearnedTargets(3 * torch.randn(50, 6), remedy)
    lt.weight.data[7] *= 5  # rows of different norms: the normalisation's gradient is not trivial
    if remedy == "ema":
        lt.ema.copy_(torch.randn(50, 6))
    ids = torch.tensor([[7, 3, -100], [7, 7, 12]])
    weights = torch.randn(2, 3, 6)
    rows, local = lt.rows_for_loss(ids)
    assert rows.shape == (3, 6) and local[0, 2] == -100 and local[0, 0] == local[1, 0] == local[1, 1]
    grads, gathered = [], []
    for table, read in ((lt.table_for_loss(), ids), lt.rows_for_loss(ids)):
        lt.weight.grad = None
        gathered.append(table[read.clamp_min(0)] * (read >= 0)[..., None])
        if table.requires_grad:
            (gathered[-1] * weights).sum().backward()
            grads.append(lt.weight.grad.clone())
    torch.testing.assert_close(gathered[1], gathered[0])
    assert len(grads) == (0 if remedy == "ema" else 2)
    if grads:
        torch.testing.assert_close(grads[1], grads[0])
        assert grads[0][7].abs().sum() > 0 and grads[0][[0, 1, 2]].abs().sum() == 0


def test_rows_for_loss_with_every_id_ignored_still_gives_a_row():
    rows, local = LearnedTargets(torch.randn(5, 3), "contrastive").rows_for_loss(torch.full((2, 2), -100))
    assert rows.shape == (1, 3) and (local == -100).all()


def test_ema_table_has_no_gradient_and_follows_the_weights():
    init = random_unit_table(6, 3, seed=0)
    lt = LearnedTargets(init, "ema", ema_decay=0.9)
    assert not lt.table_for_loss().requires_grad and lt.unit_table().requires_grad
    with torch.no_grad():
        lt.weight.copy_(random_unit_table(6, 3, seed=1))
    lt.after_step()
    torch.testing.assert_close(lt.ema, 0.9 * init + 0.1 * random_unit_table(6, 3, seed=1))
    chase = lt.extra_loss(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 3]))
    chase.backward()
    assert lt.weight.grad is not None and lt.weight.grad[:4].abs().sum() > 0


def test_no_remedy_and_all_ignored_give_zero():
    lt = LearnedTargets(torch.randn(5, 3), "none")
    assert lt.extra_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])).item() == 0.0
    lt = LearnedTargets(torch.randn(5, 3), "contrastive")
    assert lt.extra_loss(torch.randn(2, 3), torch.tensor([-100, -100])).item() == 0.0


def test_vicreg_penalty_prefers_isotropic_rows():
    iso = F.normalize(torch.randn(4096, 8), dim=1)
    line = F.normalize(torch.randn(1, 8), dim=1).repeat(4096, 1) + 1e-3 * torch.randn(4096, 8)
    assert vicreg_penalty(iso) < 0.05 < 0.9 < vicreg_penalty(line)


def test_from_config_and_param_groups():
    tcfg = TargetsConfig(learned=True, learned_remedy="vicreg", learned_lr_scale=0.1, contrastive_negatives=7, vicreg_weight=3.0)
    lt = LearnedTargets.from_config(tcfg, torch.randn(9, 4))
    assert (lt.remedy, lt.negatives, lt.vicreg_weight) == ("vicreg", 7, 3.0)
    (group,) = lt.param_groups(1e-3)
    assert group["params"][0] is lt.weight and group["lr"] == pytest.approx(1e-4) and group["weight_decay"] == 0.0
    torch.testing.assert_close(lt.weight.norm(dim=1), torch.ones(9))
    with pytest.raises(ValueError, match="learned_remedy"):
        LearnedTargets(torch.randn(3, 2), "magic")


def test_diagnostics_report_duplicates():
    table = random_unit_table(40, 8, seed=0)
    table[3] = table[7]
    d = LearnedTargets(table, "none").diagnostics()
    assert d["targets/duplicates"] == 2 and d["targets/self_retrieval"] == pytest.approx(38 / 40)
    assert d["targets/effective_rank"] == pytest.approx(diag.effective_rank(table), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CPU path is tested above)")
@pytest.mark.parametrize("remedy", ["contrastive", "vicreg", "ema"])
def test_cuda_matches_cpu(remedy):
    init, pred, ids = random_unit_table(50, 8, seed=0), torch.randn(6, 8), torch.tensor([1, 2, 3, 4, -100, 2])
    losses, diagnostics = [], []
    for device in ("cpu", "cuda"):
        lt = LearnedTargets(init, remedy, negatives=0).to(device)
        loss = lt.extra_loss(pred.to(device), ids.to(device)) + lt.table_for_loss()[ids.clamp_min(0).to(device)].sum()
        loss.backward()
        lt.after_step()
        losses.append(loss.item())
        diagnostics.append(lt.diagnostics())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert diagnostics[0] == pytest.approx(diagnostics[1], rel=1e-4)
