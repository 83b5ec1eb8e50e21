"""N:M and transposable N:M weight masks (spec sparsity.md, "Masks").

Convention: N is the number KEPT in every group of M (the hardware convention: 2:4 keeps
2 of every 4 weights). Every public function is pure and returns a bool tensor of the
weight's shape (True = kept).

Layout. A weight is viewed as 2-D (out, in). A conv weight (out, in, *kernel) is first
permuted to (out, *kernel, in) and flattened to (out, kernel_size * in), so that every group
of M runs along input channels at one kernel position: that is what sparse hardware
(2:4 tensor cores, implicit-GEMM convolutions) needs, input channels being the reduction
dimension. Transposable masks tile this (out, in) view into M x M blocks over BOTH
dimensions, so W^T (used by the input-gradient GEMM) is N:M along its own reduction
dimension (out channels) too; the reference code's M^2 consecutive inputs of one row are not.

Padding. When `in` (per kernel position) or, for transposable masks, `out` is not a multiple
of M, the |w| scores are padded with a large negative value for the search and the mask is
cropped back. A padded group therefore keeps its N largest real entries (all of them if it
has fewer than N); a padded transposable block takes padding cells only where its N per row
and per column constraint forces it. After cropping, such edge groups may keep fewer than N.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy
import torch

from fqtrun.errors import ConfigError
from fqtrun.sparsity.diversity import check_nm, count_transposable_blocks

Tensor = torch.Tensor

METHODS = ("exact", "greedy")
# Exact searches score every group/block against every valid pattern when there are at most
# this many (row-wise 2:4 -> 6, 4:8 -> 70; transposable 1:2 -> 2, 2:4 -> 90, 1:4 -> 24).
# Above it (transposable 4:8 has 1.2e11) a batched min-cost-flow solver is used.
MAX_PATTERNS = 1024
_SCORE_BYTES = 1 << 21  # per chunk: the (patterns, chunk) float64 score matrix stays in cache


def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Row-wise N:M: keep the N largest |w| in every group of M consecutive inputs."""
    check_nm(n, m)
    s, signed = _scores_2d(w, m, pad_rows=False)  # (out, k * in_pad)
    out, cols = s.shape
    groups = s.view(-1, m)
    if math.comb(m, n) <= MAX_PATTERNS:
        mask = _best_patterns(groups, _row_tables(n, m), signed)
    else:
        idx = groups.abs().topk(n, dim=-1, sorted=False).indices
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return _crop(mask.view(out, cols), w.shape, m)


def transposable_mask(w: Tensor, n: int, m: int, method: str = "exact") -> Tensor:
    """Transposable N:M: every M x M block of the (out, in) view keeps N per row and per column.

    method="exact" maximises the kept sum of |w| in every block (pattern scoring when the
    valid patterns are few, as for 2:4; batched min-cost flow otherwise, as for 4:8);
    method="greedy" keeps entries in descending |w| while their row and column have fewer
    than N kept (at least half of the optimum; it may leave a row or column below N).
    """
    check_nm(n, m)
    if method not in METHODS:
        raise ConfigError(f"sparsity.method={method!r} must be one of {METHODS}")
    s, signed = _scores_2d(w, m, pad_rows=True)  # (out_pad, k * in_pad)
    rows, cols = s.shape
    r, c = rows // m, cols // m
    if method == "exact" and count_transposable_blocks(n, m) <= MAX_PATTERNS:
        flat = _best_patterns(_BlockRows(s, m), _block_tables(n, m), signed)
    else:
        solve = greedy_blocks if method == "greedy" else flow_blocks
        blocks = _unfold(s, m)
        flat = solve(blocks.abs_() if signed else blocks, n).view(r * c, m * m)
    return _crop(_fold(flat.view(r * c, m, m), c), w.shape, m)


# ---------------------------------------------------------------- layout helpers


def _scores_2d(w: Tensor, m: int, pad_rows: bool) -> tuple[Tensor, bool]:
    """(scores (out[_pad], k * in_pad) float32, signed) with groups along input channels.

    signed=True: no padding was needed and the scores are w itself (callers take |.| of
    their small chunks, saving a pass over the weight); else they are |w| with padding.
    """
    if w.dim() < 2:
        raise ValueError(
            f"weight of shape {tuple(w.shape)} must be at least 2-D (out, in, *kernel) to take an N:M mask"
        )
    out, cin = w.shape[:2]
    k = math.prod(w.shape[2:])
    in_pad = -(-cin // m) * m
    out_pad = -(-out // m) * m if pad_rows else out
    w = w.detach()
    if in_pad == cin and out_pad == out:
        s = w.float().reshape(out, cin, k).transpose(1, 2).reshape(out, k * cin)
        return s.contiguous(), True
    s = w.abs().float().reshape(out, cin, k).transpose(1, 2)  # (out, k, in)
    # Below any sum of real |w| a block can hold: padding is taken only where forced.
    fill = -(m * m * float(s.max()) + 1.0) if s.numel() else -1.0
    padded = s.new_full((out_pad, k, in_pad), fill)
    padded[:out, :, :cin] = s
    return padded.view(out_pad, k * in_pad), False


def _crop(mask2d: Tensor, shape: torch.Size, m: int) -> Tensor:
    """Inverse of _scores_2d's layout: drop padding, back to (out, in, *kernel)."""
    out, cin = shape[:2]
    k = math.prod(shape[2:])
    in_pad = -(-cin // m) * m
    mask = mask2d[:out].reshape(out, k, in_pad)[:, :, :cin]  # (out, k, in)
    return mask.transpose(1, 2).reshape(shape)


# A run of m float32 (or m bool) values moved as ONE wide element: a transposing copy of
# 8/16-byte elements is many times faster than one of 4-byte elements on CPU.
_WIDE_F32 = {1: torch.float32, 2: torch.float64, 4: torch.complex128}
_WIDE_BOOL = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _unfold(s: Tensor, m: int) -> Tensor:
    """(R*m, C*m) float32 -> (R*C, m, m) blocks, row-major over blocks; always a copy."""
    rows, cols = s.shape
    r, c = rows // m, cols // m
    wide = _WIDE_F32.get(m)
    if wide is not None and s.is_contiguous():
        x = torch.empty(r, c, m, dtype=wide, device=s.device)
        x.copy_(s.view(wide).view(r, m, c).transpose(1, 2))
        return x.view(torch.float32).view(r * c, m, m)
    x = torch.empty(r, c, m, m, dtype=s.dtype, device=s.device)
    x.copy_(s.reshape(r, m, c, m).transpose(1, 2))
    return x.view(r * c, m, m)


def _fold(blocks: Tensor, c: int) -> Tensor:
    """(R*C, m, m) bool blocks -> (R*m, C*m) bool, the inverse of _unfold."""
    b, m, _ = blocks.shape
    r = b // c
    wide = _WIDE_BOOL.get(m)
    if wide is not None:
        x = torch.empty(r, m, c, dtype=wide, device=blocks.device)
        x.copy_(blocks.contiguous().view(torch.uint8).view(wide).view(r, c, m).transpose(1, 2))
        return x.view(torch.uint8).view(r * m, c * m).view(torch.bool)
    return blocks.view(r, c, m, m).transpose(1, 2).reshape(r * m, c * m)


class _BlockRows:
    """Lazy (R*C, m*m) view of the blocks of s, produced chunk by chunk of block rows."""

    def __init__(self, s: Tensor, m: int):
        self.s, self.m = s, m
        self.c = s.shape[1] // m
        self.shape = (s.shape[0] // m * self.c, m * m)
        self.device = s.device

    def chunk(self, lo: int, hi: int) -> Tensor:
        # lo, hi are multiples of c (whole block rows)
        return _unfold(self.s[lo // self.c * self.m : hi // self.c * self.m], self.m).view(hi - lo, -1)


# ---------------------------------------------------------------- exact search by patterns


@cache
def transposable_patterns(n: int, m: int) -> Tensor:
    """All m x m 0/1 patterns with n ones per row and per column, as bool (P, m, m)."""
    check_nm(n, m)
    count = count_transposable_blocks(n, m)
    if count > 100 * MAX_PATTERNS:
        raise ValueError(
            f"{n}:{m} has {count} transposable patterns, too many to list; use the flow solver or greedy"
        )
    row_sets = [sum(1 << j for j in c) for c in itertools.combinations(range(m), n)]
    found: list[list[int]] = []

    def rec(prefix: list[int], need: list[int]) -> None:
        if len(prefix) == m:
            found.append(prefix)
            return
        rows_after = m - len(prefix) - 1
        for bits in row_sets:
            new = [need[j] - (bits >> j & 1) for j in range(m)]
            if min(new) >= 0 and max(new) <= rows_after:
                rec(prefix + [bits], new)

    rec([], [n] * m)
    pats = torch.tensor([[[b >> j & 1 for j in range(m)] for b in p] for p in found], dtype=torch.bool)
    if pats.shape[0] != count:
        raise RuntimeError(f"listed {pats.shape[0]} {n}:{m} patterns, the count is {count}")
    return pats


@cache
def _block_tables(n: int, m: int):
    return _tables(transposable_patterns(n, m).reshape(-1, m * m), complement_valid=2 * n == m)


@cache
def _row_tables(n: int, m: int):
    rows = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for i, c in enumerate(itertools.combinations(range(m), n)):
        rows[i, list(c)] = True
    return _tables(rows, complement_valid=2 * n == m)


def _tables(flat: Tensor, complement_valid: bool) -> tuple[Tensor, Tensor, int, int]:
    """(score matrix (P' [+1], k) float32, mask table (P, k) bool, P' scored, index bits).

    When the complement of every valid pattern is valid (2N = M), only the P/2 patterns
    keeping cell 0 are scored, plus an all-ones row giving the group total; the best pattern
    is then the better of argmax S and the complement of argmin S.
    """
    if complement_valid:
        scored = flat[flat[:, 0]]
        table = torch.cat([scored, ~scored])  # complement of pattern i is i + P/2
        score_mat = torch.cat([scored.float(), torch.ones(1, flat.shape[1])])
    else:
        scored = table = flat
        score_mat = flat.float()
    return (
        score_mat.contiguous(),
        table.contiguous(),
        scored.shape[0],
        max(1, (scored.shape[0] - 1).bit_length()),
    )


def _best_patterns(x, tables, signed: bool) -> Tensor:
    """For every row of x (G, k) (a tensor or _BlockRows), the valid pattern of max kept |x|.

    Per chunk: one float32 matmul with the pattern matrix, the scores widened to float64 and
    the pattern index written into their low mantissa bits, so one amax returns the best
    score AND its pattern (ties broken by index; scores within 2^-42 relative count as tied),
    then a table lookup. This is the spec's "90 patterns, one matmul" for 2:4.
    """
    score_mat, table, p_scored, bits = tables
    score_mat, table = score_mat.to(x.device), table.to(x.device)
    half = score_mat.shape[0] > p_scored
    p_idx = torch.arange(p_scored, device=x.device).unsqueeze(1)
    low = (1 << bits) - 1
    g, k = x.shape
    out = torch.empty(g, k, dtype=torch.bool, device=x.device)
    step = max(1, _SCORE_BYTES // (8 * score_mat.shape[0]))
    if isinstance(x, _BlockRows):
        step = max(1, step // x.c) * x.c
    for lo in range(0, g, step):
        hi_ = min(g, lo + step)
        xc = x.chunk(lo, hi_) if isinstance(x, _BlockRows) else x[lo:hi_]
        if signed:
            xc = xc.abs()
        sc = torch.mm(score_mat, xc.T).double()  # (P' [+1], chunk)
        keys = sc[:p_scored]
        keys.view(torch.int64).bitwise_and_(~low).bitwise_or_(p_idx)  # low bits := pattern index
        best_hi = keys.amax(dim=0)
        if half:
            best_lo = keys.amin(dim=0)
            use_comp = (sc[p_scored] - best_lo) > best_hi
            best = (torch.where(use_comp, best_lo, best_hi).view(torch.int64) & low) + use_comp * p_scored
        else:
            best = best_hi.view(torch.int64) & low
        out[lo:hi_] = table.index_select(0, best)
    return out


# ---------------------------------------------------------------- greedy


def greedy_blocks(blocks: Tensor, n: int) -> Tensor:
    """Greedy on scores (B, m, m): visit cells by descending score, keep while row and column < n.

    Vectorised over blocks; the only loop is over the m*m positions of the sorted order.
    For m <= 8 the row and column counts are packed 4 bits each into one int64 per block, so
    each step is a few elementwise ops; larger m uses gather/scatter on count tensors.
    """
    b, m, _ = blocks.shape
    out = torch.empty(b, m * m, dtype=torch.bool, device=blocks.device)
    step = 1 << 14
    for lo in range(0, b, step):
        x = blocks[lo : lo + step].reshape(-1, m * m)
        out[lo : lo + step] = _greedy_packed(x, n, m) if m <= 8 else _greedy_gather(x, n, m)
    return out.view(b, m, m)


def _descending_cells(x: Tensor, m: int) -> Tensor:
    """(m*m, B): row k holds, for every block (row of x (B, m*m)), its k-th largest cell.

    float32 bits read as int32 order like the floats for x >= 0 (the negative padding value
    sorts below every real score); the cell index rides in the low bits (ties: larger cell
    first), so sorting plain int64 keys suffices. On CPU numpy's vectorised integer sort is
    about 10x torch.sort for these short rows.
    """
    bits = (m * m - 1).bit_length()
    keys = (x.contiguous().view(torch.int32).long() << bits) | torch.arange(m * m, device=x.device)
    if keys.device.type == "cpu":
        asc = numpy.sort(keys.numpy(), axis=1)
        keys = torch.from_numpy(numpy.ascontiguousarray(asc.T[::-1]))
    else:
        keys = keys.sort(dim=1, descending=True).values.T.contiguous()
    return keys & ((1 << bits) - 1)


def _greedy_packed(x: Tensor, n: int, m: int) -> Tensor:
    # m <= 8: counts packed 4 bits per row (rc) / column (cc), kept cells as bits of one int64.
    cells = _descending_cells(x, m)  # (m*m, B)
    if m & (m - 1) == 0:  # power of two: row = cell >> log2(m), col = cell & (m - 1)
        shift_r, shift_c = (cells >> (m.bit_length() - 1)) << 2, (cells & (m - 1)) << 2
    else:
        shift_r, shift_c = torch.div(cells, m, rounding_mode="floor") * 4, (cells % m) * 4
    rc = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    cc = torch.zeros_like(rc)
    kept = torch.zeros_like(rc)
    full = sum(n << (4 * i) for i in range(m))  # every row holds n
    for k in range(m * m):
        sr, sc = shift_r[k], shift_c[k]
        ok = ((((rc >> sr) & 15) < n) & (((cc >> sc) & 15) < n)).long()
        rc += ok << sr
        cc += ok << sc
        kept |= ok << cells[k]
        if k >= n * m - 1 and k % 8 == 7 and bool((rc == full).all()):
            break
    return ((kept.unsqueeze(1) >> torch.arange(m * m, device=x.device)) & 1).bool()


def _greedy_gather(x: Tensor, n: int, m: int) -> Tensor:
    cells = _descending_cells(x, m).T  # (B, m*m)
    rows, cols = cells // m, cells % m
    row_cnt = torch.zeros(x.shape[0], m, dtype=torch.int32, device=x.device)
    col_cnt = torch.zeros_like(row_cnt)
    kept = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    for k in range(m * m):
        r, c = rows[:, k : k + 1], cols[:, k : k + 1]
        ok = (row_cnt.gather(1, r) < n) & (col_cnt.gather(1, c) < n)
        kept[:, k : k + 1] = ok
        row_cnt.scatter_add_(1, r, ok.int())
        col_cnt.scatter_add_(1, c, ok.int())
    return torch.zeros_like(kept).scatter_(1, cells, kept)


# ---------------------------------------------------------------- exact search by min-cost flow


def flow_blocks(blocks: Tensor, n: int) -> Tensor:
    """Exact optimum per block by min-cost flow (successive shortest paths), batched over blocks.

    Network (spec sparsity.md): s -> row i (cap n), row i -> col j (cap 1, cost -score_ij),
    col j -> t (cap n). Each block needs n*m unit augmentations; each finds a shortest path
    in the residual graph of all blocks at once by Bellman-Ford with strict relaxation (an
    improvement must exceed a 1e-12 relative tolerance, so ties and rounding never form
    predecessor cycles). Augmenting along shortest paths from the empty flow keeps every
    intermediate flow min-cost, hence the final one is optimal (up to that tolerance).
    """
    b, m, _ = blocks.shape
    out = torch.empty(b, m, m, dtype=torch.bool, device=blocks.device)
    step = 1 << 12
    for lo in range(0, b, step):
        out[lo : lo + step] = _flow_chunk(blocks[lo : lo + step].double(), n)
    return out


def _pack_min(cand: Tensor, idx: Tensor, dim: int, low: int) -> Tensor:
    """min over dim of float64 cand with its index packed into the low mantissa bits (one amin)."""
    cand.view(torch.int64).bitwise_and_(~low).bitwise_or_(idx)
    return cand.amin(dim=dim)


def _flow_chunk(score: Tensor, n: int) -> Tensor:
    # Layout (row i, col j, block b): blocks innermost, so every reduction over i or j is a
    # vectorised elementwise min across contiguous planes. Distances are float64 with the
    # predecessor packed into their low bits (value m = "source"), a change of 2^-48 at most.
    b, m, _ = score.shape
    dev, dt = score.device, torch.float64
    big = 1e300  # "unreachable"; finite so that index bits can be packed into it
    cost = (-score).to(dt).permute(1, 2, 0).contiguous()  # (m, m, b)
    tol = 1e-12 * (2 * m * float(cost.abs().max()) + 1e-30) if b else 0.0
    low = (1 << m.bit_length()) - 1
    idx_i = torch.arange(m, device=dev).view(m, 1, 1)
    idx_j = torch.arange(m, device=dev).view(1, m, 1)
    x = torch.zeros(m, m, b, dtype=torch.bool, device=dev)
    row_def = torch.full((m, b), n, dtype=torch.int64, device=dev)
    col_def = torch.full((m, b), n, dtype=torch.int64, device=dev)
    ar = torch.arange(b, device=dev)
    fwd = cost.clone()  # residual row i -> col j: cost where x = 0, else unreachable
    bwd = torch.full_like(cost, big)  # residual col j -> row i: -cost where x = 1
    for _ in range(n * m):
        d_row = torch.full((m, b), big, dtype=dt, device=dev).masked_fill_(row_def > 0, 0.0)  # sources
        d_row.view(torch.int64).bitwise_or_(m)  # predecessor "source"
        d_col = torch.full((m, b), big, dtype=dt, device=dev)
        for _round in range(m + 2):
            cand = _pack_min(d_row.unsqueeze(1) + fwd, idx_i, 0, low)  # (m_j, b), pred row inside
            better_c = cand < d_col - tol
            d_col = torch.where(better_c, cand, d_col)
            cand = _pack_min(d_col.unsqueeze(0) + bwd, idx_j, 1, low)  # (m_i, b), pred col inside
            better_r = cand < d_row - tol
            d_row = torch.where(better_r, cand, d_row)
            if not bool(better_c.any() | better_r.any()):
                break
        else:
            raise RuntimeError("flow_blocks: Bellman-Ford did not converge (non-finite weights?)")
        pred_col = d_col.view(torch.int64) & low  # row that reached col j
        pred_row = d_row.view(torch.int64) & low  # col that reached row i, m = source
        sink = d_col.masked_fill(col_def <= 0, 2 * big).view(m, 1, b)
        j = _pack_min(sink, idx_i, 0, low).view(torch.int64)[0] & low  # cheapest column needing ones
        col_def[j, ar] -= 1
        active = torch.ones(b, dtype=torch.bool, device=dev)
        for _step in range(m + 1):  # walk the path back: forward edges set, backward edges cleared
            i = pred_col.gather(0, j.unsqueeze(0))[0]
            cell = (i[active], j[active], ar[active])
            x[cell], fwd[cell], bwd[cell] = True, big, -cost[cell]
            nxt = pred_row.gather(0, i.unsqueeze(0))[0]
            ends = active & (nxt == m)
            row_def[i[ends], ar[ends]] -= 1
            active &= nxt != m
            if not bool(active.any()):
                break
            cell = (i[active], nxt[active], ar[active])
            x[cell], fwd[cell], bwd[cell] = False, cost[cell], big
            j = torch.where(active, nxt, j)
        else:
            raise RuntimeError("flow_blocks: augmenting path did not terminate")
    if bool((x.sum(dim=0) != n).any() or (x.sum(dim=1) != n).any()):
        raise RuntimeError("flow_blocks: internal error, a block is not N per row and column")
    return x.permute(2, 0, 1)
