"""Sequence packing at forward time (data.packing): the rows of a micro-batch -- DPO's and the
reward model's chosen and rejected sequences, KTO's completions, PPO's rollouts -- re-laid as
fewer, fuller rows for the model call, and the results put back where each row had them.

Each row contributes one span of positions, from its first real token (after any left padding) to
the last position its loss reads, and spans are placed first-fit in order of decreasing length
into rows of a width chosen to compute the fewest positions (:func:`choose_width`). Inside a
packed row a position attends causally within its own span only, and positions restart at 0 with
each span (:func:`nemo_rlhf.modules.forward_only.packed_attention`), so every position computes
what it computes unpacked: learned positions are the same ids, rotary embeddings depend only on
the distance between two positions of one span. The NLL and the heads' outputs come back in the
unpacked layout (:meth:`PackedRows.unpack`), so the loss functions do not know packing happened.

Megatron's local attention takes the block-diagonal mask; Transformer Engine's would take
``PackedSeqParams`` (cu_seqlens) instead, which is not wired (data.packing refuses TE). The number
of packed rows varies per micro-batch, so pipeline stages (fixed activation shapes) do not pack.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

_POSITIONS: contextvars.ContextVar[Optional[List[int]]] = contextvars.ContextVar("packed_positions", default=None)


@contextlib.contextmanager
def counting_positions() -> Iterator[List[int]]:
    """A box [n]: the positions the packed forwards with gradients (the trained model's, not a
    frozen reference's) computed inside the block -- what a step's throughput counts."""
    box = [0]
    token = _POSITIONS.set(box)
    try:
        yield box
    finally:
        _POSITIONS.reset(token)


def record_positions(n: int) -> None:
    box = _POSITIONS.get()
    if box is not None and torch.is_grad_enabled():
        box[0] += n


@dataclass
class PackedRows:
    """A micro-batch of ``shape`` = (B, S) re-laid as [R, W] rows."""

    tokens: torch.Tensor                 # [R, W]
    labels: Optional[torch.Tensor]       # [R, W] or None
    segments: torch.Tensor               # [R, W] the span each position belongs to (1, 2, ...; 0: empty)
    index: torch.Tensor                  # [n] flat positions in the packed [R * W] ...
    source: torch.Tensor                 # [n] ... and where they came from in the original [B * S]
    shape: Tuple[int, int]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[R, W, ...] results -> [B, S, ...]: each span's results at its original positions, ``fill``
        elsewhere (positions no loss reads). Differentiable."""
        b, s = self.shape
        r, w = x.shape[:2]
        rest = x.shape[2:]
        flat = x.reshape(r * w, *rest)
        out = flat.new_full((b * s, *rest), fill)
        return out.index_copy(0, self.source, flat.index_select(0, self.index)).view(b, s, *rest)

    def to_causal(self, x: torch.Tensor) -> torch.Tensor:
        """As a :class:`~nemo_rlhf.models.heads.DecoderStates` layout: per-position head outputs of the
        packed rows [R, W, ...] -> the batch's [B, S, ...]."""
        return self.unpack(x)


def spans(loss_mask: torch.Tensor, pad: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(starts [B], ends [B]) of each row's span: from its first real token (``pad`` [B] left-padding
    tokens, or 0) to one past the last position ``loss_mask`` [B, S] reads (end = start for a row
    whose loss reads nothing: it is left out)."""
    b, s = loss_mask.shape
    starts = torch.zeros(b, dtype=torch.long) if pad is None else pad.to("cpu", torch.long)
    used = loss_mask.detach().to("cpu").ne(0)
    last = torch.where(used, torch.arange(s)[None, :], torch.full_like(used, -1, dtype=torch.long)).max(1).values
    return starts, torch.maximum(last + 1, starts)


def first_fit(sizes: List[int], width: int) -> Tuple[List[int], List[int], int]:
    """(row, offset) of each item placed first-fit in order of decreasing size (ties: in order) into
    rows of ``width``, and the number of rows. Items of size 0 get row -1."""
    rows, offsets, room = [-1] * len(sizes), [0] * len(sizes), []
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        if sizes[i] <= 0:
            continue
        if sizes[i] > width:
            raise ValueError(f"a span of {sizes[i]} positions does not fit rows of {width}")
        row = next((r for r, free in enumerate(room) if free >= sizes[i]), None)
        if row is None:
            room.append(width)
            row = len(room) - 1
        rows[i], offsets[i] = row, width - room[row]
        room[row] -= sizes[i]
    return rows, offsets, len(room)


WIDTHS = (1.0, 1.25, 1.5, 2.0)
"""Row widths tried, as multiples of the longest span: the one that computes the fewest positions
(rows x width) wins, the narrower on a tie. Wider rows fill better; attention's cost per row grows
with the square of the width, which at these factors stays small next to the MLPs."""


def choose_width(sizes: List[int], multiple: int = 1) -> int:
    """The row width for spans of ``sizes``: a multiple of ``multiple`` (sequence parallelism splits
    the sequence over the TP ranks), from :data:`WIDTHS`."""
    longest = max(max(sizes, default=1), 1)
    best = None
    for factor in WIDTHS:
        width = -(-int(math.ceil(longest * factor)) // multiple) * multiple
        cost = max(first_fit(sizes, width)[2], 1) * width
        if best is None or cost < best[0]:
            best = (cost, width)
    return best[1]


def pack_rows(tokens: torch.Tensor, labels: Optional[torch.Tensor], starts: torch.Tensor, ends: torch.Tensor,
              width: Optional[int] = None, multiple: int = 1) -> PackedRows:
    """Pack the spans [starts[i], ends[i]) of ``tokens`` / ``labels`` [B, S] into rows of ``width``
    (default: :func:`choose_width`'s, a multiple of ``multiple``). At least one row comes back (all
    empty: one row of padding)."""
    b, s = tokens.shape
    sizes = (ends - starts).clamp(min=0)
    width = width or choose_width(sizes.tolist(), multiple)
    rows, offsets, n_rows = first_fit(sizes.tolist(), width)
    n_rows = max(n_rows, 1)
    placed = torch.tensor([i for i in range(b) if rows[i] >= 0], dtype=torch.long)
    counts = sizes[placed]
    seq = torch.repeat_interleave(torch.arange(len(placed)), counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    row_of = torch.tensor(rows, dtype=torch.long)[placed][seq]
    off_of = torch.tensor(offsets, dtype=torch.long)[placed][seq]
    device = tokens.device
    index = (row_of * width + off_of + within).to(device)
    source = (placed[seq] * s + starts[placed][seq] + within).to(device)
    packed = tokens.new_zeros(n_rows * width)
    packed[index] = tokens.reshape(-1)[source]
    packed_labels = None
    if labels is not None:
        packed_labels = labels.new_zeros(n_rows * width)
        packed_labels[index] = labels.reshape(-1)[source]
        packed_labels = packed_labels.view(n_rows, width)
    record_positions(n_rows * width)
    segments = torch.zeros(n_rows * width, dtype=torch.long, device=device)
    segments[index] = (seq + 1).to(device)
    return PackedRows(packed.view(n_rows, width), packed_labels, segments.view(n_rows, width), index, source, (b, s))
