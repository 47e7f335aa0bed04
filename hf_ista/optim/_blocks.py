"""Cutting a parameter into the blocks that block Shampoo (DASH) preconditions.

A parameter is seen as a matrix (a vector as one row; a tensor of more dimensions as
``[shape[0], prod(shape[1:])]``), cut into blocks of ``br x bc`` with ``br = min(B, rows)`` and
``bc = min(B, cols)``: a matrix smaller than ``B`` is one block of its own shape, a larger one is
zero-padded up to a multiple of ``B`` (the authors require a multiple instead). Zero rows and
columns of a padded block stay zero through every Shampoo step (its ``L`` and ``R`` are
block-diagonal with a zero part, and the update there is 0), and are cropped on the way back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def matrix_shape(shape: torch.Size | tuple) -> tuple[int, int]:
    """The ``(rows, cols)`` a parameter of ``shape`` is preconditioned as."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def block_shape(rows: int, cols: int, block_size: int) -> tuple[int, int]:
    return min(block_size, rows), min(block_size, cols)


def block_grid(rows: int, cols: int, br: int, bc: int) -> tuple[int, int]:
    """How many blocks down and across."""
    return math.ceil(rows / br), math.ceil(cols / bc)


def to_blocks(matrix: torch.Tensor, br: int, bc: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``matrix`` (``[rows, cols]``) as ``[n_blocks, br, bc]``, row of blocks by row of blocks,
    zero-padded at the bottom and right edges; written into ``out`` when given."""
    rows, cols = matrix.shape
    down, across = block_grid(rows, cols, br, bc)
    padded = F.pad(matrix, (0, across * bc - cols, 0, down * br - rows))
    tiles = padded.view(down, br, across, bc).permute(0, 2, 1, 3)
    if out is None:
        return tiles.reshape(down * across, br, bc)
    out.view(down, across, br, bc).copy_(tiles)
    return out


def from_blocks(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`to_blocks`: ``[n_blocks, br, bc]`` back to ``[rows, cols]``."""
    _, br, bc = blocks.shape
    down, across = block_grid(rows, cols, br, bc)
    matrix = blocks.view(down, across, br, bc).permute(0, 2, 1, 3).reshape(down * br, across * bc)
    return matrix[:rows, :cols]
