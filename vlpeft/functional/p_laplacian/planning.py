"""Row-block and chunk planning of the p-Laplacian block, and views of one block.

Both variants work on blocks of query rows, each over the leading key columns that hold its edges only:
a plan is a list ``[(rows, n_keys), ...]`` of row slices tiling [0, n_q) in order, with ``attn[..., rows, n_keys:]``
exactly 0. With ``chunk_size`` the blocks are its row blocks (bounding the working memory to
O(batch * heads * chunk_size * n_k)); without, the rows are split into blocks only where that skips enough pairs
(a causal attention skips about half of them). Shapes: attn (batch, heads, n_q, n_k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from vlpeft.functional.shapes import broadcast_shapes

#: Query rows per block when no ``chunk_size`` is given, used only where the attention has an empty upper-right
#: staircase (causal masks): each block then works on the key columns that hold its edges only.
AUTO_BLOCK_ROWS = 128
#: Split into row blocks without a ``chunk_size`` only if that skips at least this fraction of the pairs.
AUTO_BLOCK_MIN_SAVING = 0.15

Plan = list[tuple[slice, int]]


def key_extents(attn: Tensor, slices: list[slice]) -> list[int]:
    """For each block of query rows, 1 + the last key column with a non-zero attention entry (at least 1).

    Attention of a causal block has no edge right of its diagonal: those pairs have weight exactly 0 in both
    variants and receive no gradient through their weight, so a block only needs its leading key columns. One
    reduction per block (a read of the attention) and one host read of the extents.
    """
    n_k = attn.shape[-1]
    marks = []
    for rows in slices:
        columns = attn[..., rows, :].detach().amax(dim=-2).reshape(-1, n_k).amax(dim=0)  # (n_k,)
        marks.append(columns > 0)
    positions = torch.arange(1, n_k + 1, device=attn.device)
    ends = (torch.stack(marks) * positions).amax(dim=-1)
    return [max(1, int(end)) for end in ends.tolist()]


def block_plan(attn: Tensor, n_q: int, chunk_size: int | None) -> Plan:
    """Blocks of query rows with the number of leading key columns each needs (see :func:`key_extents`).

    With ``chunk_size`` the blocks are its row blocks. Without, the rows are split into equal blocks of about
    :data:`AUTO_BLOCK_ROWS` (see :func:`even_row_slices`) only when that skips enough pairs (a causal attention
    skips about half); otherwise one block of all rows (over all keys when the rows make one block anyway: then the
    attention is not read for extents at all).
    """
    n_k = attn.shape[-1]
    if n_q == 0:
        return [(slice(0, 0), n_k)]
    if chunk_size is not None:
        slices = row_slices(n_q, chunk_size)
        return list(zip(slices, key_extents(attn, slices)))
    slices = even_row_slices(n_q, AUTO_BLOCK_ROWS)
    if len(slices) == 1:
        return [(slices[0], n_k)]  # nothing to skip between blocks; trailing empty key columns are rare
    extents = key_extents(attn, slices)
    pairs = sum((rows.stop - rows.start) * keys for rows, keys in zip(slices, extents))
    if pairs <= (1.0 - AUTO_BLOCK_MIN_SAVING) * n_q * n_k:
        return list(zip(slices, extents))
    return [(slice(0, n_q), max(extents))]


def checked_block_plan(plan: Sequence[tuple[slice, int]], n_q: int, n_k: int) -> Plan:
    """``plan`` as a list after checking that its row slices tile [0, n_q) in order with key counts in [1, n_k]."""
    checked, start = [], 0
    for entry in plan:
        rows, keys = entry if isinstance(entry, tuple) and len(entry) == 2 else (None, None)
        if (not isinstance(rows, slice) or rows.start != start or rows.step not in (None, 1)
                or not isinstance(rows.stop, int) or rows.stop <= start or isinstance(keys, bool)
                or not isinstance(keys, int) or not 1 <= keys <= n_k):
            raise ValueError(f"attn_block_plan must be [(slice(start, stop), n_keys), ...] tiling the {n_q} query "
                             f"rows in order with 1 <= n_keys <= {n_k}; got {entry!r} after row {start}")
        checked.append((slice(start, rows.stop), keys))
        start = rows.stop
    if start != n_q:
        raise ValueError(f"attn_block_plan covers rows [0, {start}), expected all {n_q} query rows")
    return checked


def row_slices(n_q: int, chunk_size: int | None) -> list[slice]:
    """Consecutive blocks of ``chunk_size`` rows (the last one shorter), or one block of all rows."""
    if chunk_size is None or n_q <= chunk_size:
        return [slice(0, n_q)]
    return [slice(start, min(start + chunk_size, n_q)) for start in range(0, n_q, chunk_size)]


def even_row_slices(n_q: int, target: int) -> list[slice]:
    """round(n_q / target) blocks of (nearly) equal size, e.g. 643 rows -> 5 blocks of 129/128 rows instead of 5 x 128
    + 3: each block costs a fixed Python/dispatch overhead (dozens of small ops), so a small last block is waste."""
    blocks = max(1, round(n_q / target))
    size = -(-n_q // blocks)
    return [slice(start, min(start + size, n_q)) for start in range(0, n_q, size)]


def graph_count(x_q: Tensor, x_kv: Tensor, attn: Tensor, head_mean: bool) -> int:
    """The number of independent graphs of a call: the product of its broadcast leading (batch, heads) shape
    (with ``head_mean`` the graph is the mean over attn's heads, so those count once)."""
    graph_lead = (attn.shape[0], 1) if head_mean else attn.shape[:-2]
    return math.prod(broadcast_shapes(x_q.shape[:-2], x_kv.shape[:-2], graph_lead))


# ------------------------------------------------------------------------------------------ views of one block


def row_block(tensor: Tensor, rows: slice) -> Tensor:
    """Rows of a tensor broadcastable to (.., n_q, 1 or n_k); coefficients without a row axis pass through."""
    return tensor[..., rows, :] if tensor.dim() >= 2 and tensor.shape[-2] != 1 else tensor


def key_columns(tensor: Tensor, n_keys: int) -> Tensor:
    """The first ``n_keys`` key columns of a (.., 1, n_k) tensor (0-d tensors pass through)."""
    return tensor[..., :n_keys] if tensor.dim() > 0 else tensor


def pad_keys(tensor: Tensor, n_k: int) -> Tensor:
    """A (.., 1, n_keys) tensor zero-padded to n_k key columns."""
    return tensor if tensor.shape[-1] == n_k else torch.nn.functional.pad(tensor, (0, n_k - tensor.shape[-1]))


def concat_rows(blocks: list[Tensor]) -> Tensor:
    """The blocks' (.., rows, x) tensors joined along the row axis."""
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)
