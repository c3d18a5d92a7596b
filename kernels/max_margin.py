"""Max-margin's most-violating negative over the whole vocabulary, tile by tile (Triton).

    j* = argmax_{j≠y} cos(p, E_j) − cos(e, E_j) = argmax_{j≠y} (μ − ê_t)·E_j / ‖E_j‖

One program owns BLOCK_N tokens and streams the table in [BLOCK_V, BLOCK_D] tiles, keeping a running
(max, argmax) per token: no N×V score matrix exists, only BLOCK_N×BLOCK_V scores at a time. The
query μ − ê_t is rebuilt per D chunk from p and the gathered target row (no N×D temporary). Ties
keep the lowest index, as torch.argmax does. The loss itself then runs in pointwise.py with the
negative row gathered there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pretrain_kernels.params import EPS
from pretrain_kernels.pointwise import interpreting


@triton.jit
def _negative_search_kernel(
    pred_ptr, ids_ptr, table_ptr, inv_norm_ptr, out_ptr,
    N, V, D, stride_pred, stride_table, ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (ids != ignore_index)
    safe_ids = tl.where(valid, ids, 0).to(tl.int64)
    pred_rows = pred_ptr + rows.to(tl.int64)[:, None] * stride_pred
    target_rows = table_ptr + safe_ids[:, None] * stride_table

    # Pass 1: the norms of p and e.
    sum_pp = tl.zeros([BLOCK_N], dtype=tl.float32)
    sum_ee = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = valid[:, None] & (cols[None, :] < D)
        p = tl.load(pred_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        e = tl.load(target_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sum_pp += tl.sum(p * p, axis=1)
        sum_ee += tl.sum(e * e, axis=1)
    inv_p = 1.0 / tl.maximum(tl.sqrt(sum_pp), 1e-8)
    inv_e = 1.0 / tl.maximum(tl.sqrt(sum_ee), 1e-8)

    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        vocab = v0 + tl.arange(0, BLOCK_V)
        vocab_ok = vocab < V
        scores = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = valid[:, None] & (cols[None, :] < D)
            p = tl.load(pred_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            e = tl.load(target_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            query = p * inv_p[:, None] - e * inv_e[:, None]
            # Table tile read transposed: [BLOCK_D, BLOCK_V].
            tile = tl.load(
                table_ptr + vocab.to(tl.int64)[None, :] * stride_table + cols[:, None],
                mask=vocab_ok[None, :] & (cols[:, None] < D),
                other=0.0,
            )
            if DOT_FP32:
                scores += tl.dot(query, tile.to(tl.float32), input_precision="ieee")
            else:
                scores += tl.dot(query.to(tile.dtype), tile)
        inv_norm = tl.load(inv_norm_ptr + vocab, mask=vocab_ok, other=0.0)
        scores = scores * inv_norm[None, :]
        allowed = vocab_ok[None, :] & (vocab[None, :] != ids[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        tile_idx = tl.argmax(scores, axis=1).to(tl.int64) + v0
        better = tile_best > best  # strict: earlier tiles win ties
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(out_ptr + rows, best_idx, mask=row_ok)


def search_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D). The interpreter pays per program and per loop step, so it gets
    wide tiles; a GPU gets matmul-shaped ones (tl.dot needs every block ≥ 16)."""
    if interpreting():
        return 32, 128, min(512, max(16, triton.next_power_of_2(dim)))
    return 64, 128, 64


def most_violating_negatives(pred: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """j* per row of pred [N, D] (int64 [N]; any value at ignored rows), without an N×V matrix."""
    n_rows, dim = pred.shape
    vocab = table.shape[0]
    if vocab < 2:
        raise ValueError("the margin loss needs a target table with at least 2 rows (a negative besides the target)")
    pred = pred.contiguous() if pred.stride(-1) != 1 else pred
    table = table.contiguous() if table.stride(-1) != 1 else table
    # One pass over the table for its row norms (V floats), so the tiles need no reduction for them;
    # accumulated in float32 without a float32 copy of the table (512 MiB at V=256k, D=512).
    inv_norm = 1.0 / torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32).clamp_min(EPS)
    out = torch.empty(n_rows, dtype=torch.int64, device=pred.device)
    block_n, block_v, block_d = search_blocks(dim)
    _negative_search_kernel[(triton.cdiv(n_rows, block_n),)](
        pred, ids.contiguous(), table, inv_norm, out,
        n_rows, vocab, dim, pred.stride(0), table.stride(0), ignore_index,
        # bf16 tl.dot returns garbage in the interpreter (triton 3.9): upcast there.
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, DOT_FP32=table.dtype == torch.float32 or interpreting(),
        num_warps=4,
    )
    return out
