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
from pretrain_kernels.pointwise import EPS_C, interpreting


@triton.jit
def _negative_search_kernel(
    pred_ptr, ids_ptr, table_ptr, inv_norm_ptr, best_ptr, best_idx_ptr,
    N, V, D, stride_pred, stride_table, ignore_index, vocab_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr,
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
    inv_p = 1.0 / tl.maximum(tl.sqrt(sum_pp), EPS_C)
    inv_e = 1.0 / tl.maximum(tl.sqrt(sum_ee), EPS_C)

    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    # This program's share of the vocabulary (grid axis 1), a multiple of BLOCK_V.
    v_start = tl.program_id(1) * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        vocab = v0 + tl.arange(0, BLOCK_V)
        vocab_ok = vocab < v_end
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
            if DOT_MODE == "ieee":
                scores += tl.dot(query, tile.to(tl.float32), input_precision="ieee")
            elif DOT_MODE == "tf32":
                scores += tl.dot(query, tile.to(tl.float32), input_precision="tf32")
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
    split_offset = tl.program_id(1).to(tl.int64) * N
    tl.store(best_ptr + split_offset + rows, best, mask=row_ok)
    tl.store(best_idx_ptr + split_offset + rows, best_idx, mask=row_ok)


def search_blocks(dim: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D). The interpreter pays per program and per loop step, so it gets
    wide tiles; a GPU gets matmul-shaped ones (tl.dot needs every block ≥ 16)."""
    if interpreting():
        return 32, 128, min(512, max(16, triton.next_power_of_2(dim)))
    return 64, 128, 64


def dot_mode(table_dtype: torch.dtype) -> str:
    """Precision of the search's tl.dot: "native" (bf16/fp16 inputs, fp32 accumulation); fp32 tables
    follow torch's own switch, torch.backends.cuda.matmul.allow_tf32 ("tf32": ~10× the IEEE rate on
    tensor cores, a near-tie may then pick another equally violating negative; "ieee": the argmax
    equals the reference's). The interpreter always gets "ieee" (its bf16 tl.dot returns garbage)."""
    if interpreting():
        return "ieee"
    if table_dtype != torch.float32:
        return "native"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def vocab_splits(n_row_programs: int, vocab_tiles: int, device: torch.device) -> int:
    """How many programs share one row block's vocabulary: enough for ~4 programs per SM (at N=8192
    the row blocks alone are 128 programs, fewer than one GPU's SMs); 1 in the interpreter."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_tiles, triton.cdiv(4 * sms, n_row_programs)))


def most_violating_negatives(
    pred: torch.Tensor, ids: torch.Tensor, table: torch.Tensor, ignore_index: int, splits: int | None = None
) -> torch.Tensor:
    """j* per row of pred [N, D] (int64 [N]; any value at ignored rows), without an N×V matrix.

    The vocabulary is cut into `splits` ranges searched by separate programs (default: vocab_splits);
    the per-range winners are reduced here, lowest range first on ties (= lowest index, like argmax)."""
    n_rows, dim = pred.shape
    vocab = table.shape[0]
    if vocab < 2:
        raise ValueError("the margin loss needs a target table with at least 2 rows (a negative besides the target)")
    pred = pred.contiguous() if pred.stride(-1) != 1 else pred
    table = table.contiguous() if table.stride(-1) != 1 else table
    # One pass over the table for its row norms (V floats), so the tiles need no reduction for them;
    # accumulated in float32 without a float32 copy of the table (512 MiB at V=256k, D=512).
    inv_norm = 1.0 / torch.linalg.vector_norm(table, dim=-1, dtype=torch.float32).clamp_min(EPS)
    block_n, block_v, block_d = search_blocks(dim)
    row_programs, vocab_tiles = triton.cdiv(n_rows, block_n), triton.cdiv(vocab, block_v)
    splits = splits or vocab_splits(row_programs, vocab_tiles, pred.device)
    if not 1 <= splits <= vocab_tiles:
        raise ValueError(f"splits={splits}: choose 1..{vocab_tiles} (vocabulary tiles of {block_v})")
    vocab_per_split = triton.cdiv(vocab_tiles, splits) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)  # no empty range
    best = torch.empty((splits, n_rows), dtype=torch.float32, device=pred.device)
    best_idx = torch.empty((splits, n_rows), dtype=torch.int64, device=pred.device)
    _negative_search_kernel[(row_programs, splits)](
        pred, ids.contiguous(), table, inv_norm, best, best_idx,
        n_rows, vocab, dim, pred.stride(0), table.stride(0), ignore_index, vocab_per_split,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, DOT_MODE=dot_mode(table.dtype),
        num_warps=4,
    )
    if splits == 1:
        return best_idx[0]
    winner = best.argmax(dim=0, keepdim=True)  # first maximum: the lowest range wins ties
    return best_idx.gather(0, winner).squeeze(0)
