import torch

from pretrain.targets.diagnostics import mean_pairwise_cosine
from pretrain.targets.isotropy import all_but_the_top


def _anisotropic_table(v=400, d=32, seed=0):
    # Every row = a shared direction + a strong second common direction + its own part.
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=gen)
    second = torch.randn(d, generator=gen)
    own = torch.randn(v, d, generator=gen)
    return 3 * common + torch.randn(v, 1, generator=gen) * 2 * second + own


def test_centring_removes_the_common_direction_and_keeps_unit_rows():
    table = _anisotropic_table()
    assert mean_pairwise_cosine(table) > 0.5
    out = all_but_the_top(table, components=1)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(out)), atol=1e-5)
    assert abs(mean_pairwise_cosine(out)) < 0.02
    # The removed direction is gone: no row projects on the unit rows' top principal direction.
    unit = table / table.norm(dim=1, keepdim=True)
    top_before = torch.linalg.svd(unit - unit.mean(0), full_matrices=False).Vh[0]
    assert (out @ top_before).abs().max() < 1e-4


def test_only_selected_rows_change():
    table = _anisotropic_table()
    rows = torch.zeros(len(table), dtype=torch.bool)
    rows[:300] = True
    out = all_but_the_top(table, components=2, rows=rows)
    unit = table / table.norm(dim=1, keepdim=True)
    assert torch.equal(out[300:], unit[300:])
    assert not torch.allclose(out[:300], unit[:300])


def test_zero_components_only_subtracts_the_mean():
    table = _anisotropic_table()
    out = all_but_the_top(table, components=0)
    unit = table / table.norm(dim=1, keepdim=True)
    expected = unit - unit.mean(0)
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)


def test_built_tables_are_centred_by_default(tiny_targets):
    import json

    report = json.loads((tiny_targets.targets_path.parent / "report.json").read_text())
    assert report["isotropy"]["components_removed"] == tiny_targets.targets.remove_top_components == 2
    assert abs(report["diagnostics"]["mean_pairwise_cosine"]) < 0.05
    assert report["diagnostics"]["self_retrieval"] == 1.0


def test_too_few_rows_are_left_as_they_are_not_collapsed_onto_one_line():
    from pretrain.targets.diagnostics import duplicate_rows

    table = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    rows = torch.zeros(10, dtype=torch.bool)
    rows[:4] = True  # 4 centred rows span 3 directions; removing 2 would leave them on one line
    out = all_but_the_top(table, components=2, rows=rows)
    assert duplicate_rows(out) == []
    assert torch.allclose(out, table / table.norm(dim=1, keepdim=True))
    rows[:5] = True  # 5 rows keep 2 directions: processed, still distinct
    out = all_but_the_top(table, components=2, rows=rows)
    assert duplicate_rows(out) == [] and not torch.allclose(out[:5], table[:5] / table[:5].norm(dim=1, keepdim=True))
