"""Compressed representations ("formats") and their Gaussian mean-squared error (GMSE).

Every format has ``compress(x)`` (the reconstruction of ``x`` in the format, same shape and dtype)
and ``gmse()``: the mean-squared error with which the format fits standard Gaussian data, relative
to E[x²] = 1. Closed forms are used where one exists (scalar grids with a known scale, unstructured
magnitude sparsity); otherwise a Monte Carlo estimate on a fixed-seed Gaussian sample
(``GMSE_SAMPLES`` values).

Tensors are compressed row by row (the last dimension; a 1-D tensor is one row): scalar grids are
scaled by the row's (or group's) RMS times the grid's Gaussian-optimal clip, sparse masks keep the
``density`` share of largest magnitudes in every row.

``ste(x)`` returns the reconstruction and the gradient mask the straight-through estimator applies
to the latent weights (``None``: pass everything through), see ``hf_ista.scaling.train_formats``.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from ..kernels import scaling as kernels

GMSE_SAMPLES = 1 << 20
GMSE_SEED = 0
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- scalar grids on N(0, 1), closed form -------------------------------------------------------
def _phi(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _cell_error(lo: float, hi: float, q: float) -> float:
    """∫_lo^hi (x − q)² φ(x) dx from the Gaussian partial moments."""
    m0 = _Phi(hi) - _Phi(lo)
    m1 = _phi(lo) - _phi(hi)
    lo_t = 0.0 if math.isinf(lo) else lo * _phi(lo)
    hi_t = 0.0 if math.isinf(hi) else hi * _phi(hi)
    m2 = m0 + lo_t - hi_t
    return m2 - 2 * q * m1 + q * q * m0


def grid_mse(levels) -> float:
    """E[(x − nearest level)²] for x ~ N(0, 1) and a sorted 1-D grid of reconstruction levels."""
    levels = sorted(float(v) for v in levels)
    edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
    return sum(_cell_error(lo, hi, q) for lo, hi, q in zip(edges, edges[1:], levels))


def _golden(f, lo: float, hi: float, iters: int = 100) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


@lru_cache(maxsize=None)
def optimal_scale(unit_levels: tuple) -> tuple[float, float]:
    """The scale s minimising ``grid_mse(s · unit_levels)`` on N(0, 1), and that MSE."""
    top = max(abs(v) for v in unit_levels)
    s = _golden(lambda s: grid_mse([s * v for v in unit_levels]), 1e-3 / top, 8.0 / top)
    return s, grid_mse([s * v for v in unit_levels])


def int_unit_levels(bits: int) -> tuple:
    """The symmetric uniform grid ``linspace(−1, 1, 2^bits)`` (no zero level for any bit-width)."""
    n = 2 ** bits
    return tuple(-1.0 + 2.0 * i / (n - 1) for i in range(n))


def gaussian_sample(n: int = GMSE_SAMPLES, seed: int = GMSE_SEED, width: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n // width, width, generator=g, dtype=torch.float64)


def _relative_mse(fmt: "Format", x: torch.Tensor) -> float:
    return float(((fmt.compress(x) - x) ** 2).mean() / (x ** 2).mean())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])


def _rms(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x.pow(2).mean(dim=dim, keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)


def _scalar_quantise(x: torch.Tensor, unit_levels: tuple, scale_mult: float, group_size: Optional[int]):
    """Nearest level of ``scale · unit_levels``, scale = ``scale_mult`` · RMS of each row/group.

    Returns the reconstruction and the clip range ``|x| ≤ scale · max|level|`` as a bool mask."""
    shape = x.shape
    rows = _rows(x)
    if group_size is not None:
        if rows.shape[-1] % group_size:
            raise ValueError(f"group_size={group_size} does not divide the row length {rows.shape[-1]}")
        rows = rows.reshape(-1, group_size)
    work = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
    scale = scale_mult * _rms(work)
    levels = torch.tensor(unit_levels, dtype=work.dtype, device=work.device)
    top = float(levels.abs().max())
    u = work / scale
    if _is_uniform(unit_levels):  # the INT grid: the kernel (Triton on CUDA fp32, else its torch twin)
        out, inside = kernels.fake_quant(work, scale, int(round(math.log2(len(unit_levels)))))
        out = out.to(x.dtype)
    else:
        mids = (levels[1:] + levels[:-1]) / 2
        q = levels[torch.bucketize(u.contiguous(), mids)]
        inside = u.abs() <= top
        out = (q * scale).to(x.dtype)
    return out.reshape(shape), inside.reshape(shape)


def _is_uniform(levels: tuple) -> bool:
    return levels == int_unit_levels(int(round(math.log2(len(levels))))) if len(levels) >= 2 else False


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Per row: True at the ``round(density · cols)`` largest magnitudes (ties broken by index)."""
    rows = _rows(x)
    k = int(round(density * rows.shape[-1]))
    return kernels.topk_mask(rows, k).reshape(x.shape)


def nm_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows = _rows(x)
    if rows.shape[-1] % m:
        raise ValueError(f"N:M pattern {n}:{m}: M does not divide the row length {rows.shape[-1]}")
    blocks = rows.reshape(-1, m)
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, blocks.abs().topk(n, dim=-1).indices, True)
    return mask.reshape(x.shape)


def hadamard(dim: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester–Hadamard matrix of size ``dim`` (a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"dim={dim} is invalid: expected a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(dim)


# --- formats --------------------------------------------------------------------------------------
class Format:
    """What every format shares. Subclasses define ``ste(x) -> (reconstruction, gradient mask or
    None)``, the forward of training through the format."""

    family = "base"

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return self.ste(x)[0]

    def gmse(self) -> float:
        return _relative_mse(self, gaussian_sample())

    def to_dict(self) -> dict:
        return {"name": type(self).__name__, **asdict(self)}

    @property
    def label(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Dense(Format):
    family = "dense"

    def ste(self, x):
        return x, None

    def gmse(self) -> float:
        return 0.0

    @property
    def label(self):
        return "dense"


@dataclass(frozen=True)
class Int(Format):
    """Symmetric uniform ``bits``-bit grid ``linspace(−a, a, 2^bits)``, a = Gaussian-optimal clip ×
    RMS of each row (or of each ``group_size`` run of a row). STE mask: inside the clip range."""
    bits: int
    group_size: Optional[int] = None
    family = "int"

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} is invalid: expected 1..8")

    @property
    def clip(self) -> float:
        return optimal_scale(int_unit_levels(self.bits))[0]

    def ste(self, x):
        return _scalar_quantise(x, int_unit_levels(self.bits), self.clip, self.group_size)

    def gmse(self) -> float:
        if self.group_size is None:  # the scale is the known σ = 1: closed form
            return optimal_scale(int_unit_levels(self.bits))[1]
        return super().gmse()

    @property
    def label(self):
        return f"int{self.bits}" + (f"g{self.group_size}" if self.group_size else "")


@dataclass(frozen=True)
class Fp4(Format):
    """FP4 E2M1 (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) with a per-row scale: Gaussian-optimal × RMS."""
    family = "fp"

    @staticmethod
    def unit_levels() -> tuple:
        return tuple(sorted({-v for v in FP4_E2M1} | set(FP4_E2M1)))

    def ste(self, x):
        return _scalar_quantise(x, self.unit_levels(), optimal_scale(self.unit_levels())[0], None)

    def gmse(self) -> float:
        return optimal_scale(self.unit_levels())[1]

    @property
    def label(self):
        return "fp4"


@dataclass(frozen=True)
class Sparse(Format):
    """Magnitude sparsity: ``density`` share kept per row (``unstructured``) or ``N:M`` (N kept of
    every M; ``density`` must equal N/M or be None). STE: dense gradient (mask recomputed each step)."""
    density: Optional[float] = None
    pattern: str = "unstructured"
    family = "sparse"

    def __post_init__(self):
        if self.pattern != "unstructured":
            n, m = self.nm
            if self.density is None:
                object.__setattr__(self, "density", n / m)
            elif abs(self.density - n / m) > 1e-9:
                raise ValueError(f"density={self.density} disagrees with pattern {self.pattern}")
        if self.density is None or not 0 < self.density <= 1:
            raise ValueError(f"density={self.density!r} is invalid: expected a number in (0, 1]")

    @property
    def nm(self) -> tuple[int, int]:
        match = re.fullmatch(r"(\d+):(\d+)", self.pattern)
        if not match or not 0 < int(match[1]) <= int(match[2]):
            raise ValueError(f"pattern={self.pattern!r} is invalid: expected 'unstructured' or N:M with N <= M")
        return int(match[1]), int(match[2])

    def mask(self, x):
        return topk_mask(x, self.density) if self.pattern == "unstructured" else nm_mask(x, *self.nm)

    def ste(self, x):
        return x * self.mask(x), None

    def gmse(self) -> float:
        if self.pattern == "unstructured":  # drop |x| < t with P(|x| > t) = density
            t = _gaussian_threshold(self.density)
            return (2 * _Phi(t) - 1) - 2 * t * _phi(t)
        return super().gmse()

    @property
    def label(self):
        return f"sparse{self.density:g}" if self.pattern == "unstructured" else f"sparse{self.pattern}"


def _gaussian_threshold(density: float) -> float:
    """t with P(|x| > t) = density for x ~ N(0, 1) (bisection on erf)."""
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if 2 * (1 - _Phi(mid)) > density:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass(frozen=True)
class SparseInt(Format):
    """Sparse-then-quantised: magnitude top-``density`` per row, survivors on an INT-``bits`` grid
    whose clip (× RMS of the row's survivors) minimises the MSE of survivors of Gaussian data."""
    density: float
    bits: int
    family = "sparse_int"

    @property
    def parts(self) -> tuple[Format, Format]:
        return Sparse(self.density), Int(self.bits)

    @property
    def clip(self) -> float:
        return _sparse_int_clip(self.density, self.bits)

    def ste(self, x):
        mask = topk_mask(x, self.density)
        rows, m = _rows(x), _rows(mask)
        kept = m.sum(-1, keepdim=True).clamp_min(1)
        rms = ((rows * m) ** 2).sum(-1, keepdim=True).div(kept).sqrt().clamp_min(torch.finfo(rows.dtype).tiny)
        scale = self.clip * rms
        q, clip_ok = kernels.fake_quant(rows, scale, self.bits)
        out = torch.where(m, q, torch.zeros_like(q)).reshape(x.shape).to(x.dtype)
        inside = (clip_ok | ~m).reshape(x.shape)
        return out, inside

    @property
    def label(self):
        return f"sparse{self.density:g}+int{self.bits}"


@lru_cache(maxsize=None)
def _sparse_int_clip(density: float, bits: int) -> float:
    """Clip (in units of the survivors' RMS) minimising the quantisation MSE of the surviving tail of
    N(0, 1) (|x| > t): closed form per cell on the two tails, golden-section search."""
    t = _gaussian_threshold(density)
    surv_m2 = (2 * (1 - _Phi(t)) + 2 * t * _phi(t)) / density  # E[x² | |x| > t]
    rms = math.sqrt(surv_m2)
    levels = int_unit_levels(bits)

    def err(c):
        lv = [c * rms * v for v in levels]
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(lv, lv[1:])] + [math.inf]
        total = 0.0
        for lo, hi, q in zip(edges, edges[1:], lv):
            for a, b in ((max(lo, t), max(hi, t)), (min(lo, -t), min(hi, -t))):
                if b > a:
                    total += _cell_error(a, b, q)
        return total

    return _golden(err, 1e-3, 6.0)


@dataclass(frozen=True)
class VQ(Format):
    """Vector quantisation of ``dim``-vectors (consecutive entries of a row) after an orthonormal
    Hadamard rotation, on a k-means codebook of 2^(bits·dim) centroids learned on N(0, I) (fixed
    seed); each row is scaled by its RMS first. ``bits`` is per coordinate."""
    dim: int = 2
    bits: int = 2
    family = "vq"

    def __post_init__(self):
        hadamard(self.dim)
        if not 1 <= self.bits * self.dim <= 12:
            raise ValueError(f"VQ(dim={self.dim}, bits={self.bits}): 2^(bits·dim) must be between 2 and 4096")

    def codebook(self) -> torch.Tensor:
        return _kmeans_codebook(self.dim, 2 ** (self.bits * self.dim))

    def ste(self, x):
        rows = _rows(x)
        if rows.shape[-1] % self.dim:
            raise ValueError(f"VQ dim={self.dim} does not divide the row length {rows.shape[-1]}")
        work = rows.double()
        rms = _rms(work)
        h = hadamard(self.dim).to(work.device)
        v = (work / rms).reshape(-1, self.dim) @ h
        cb = self.codebook().to(work.device)
        nearest = torch.cdist(v, cb).argmin(-1)
        out = (cb[nearest] @ h.T).reshape(rows.shape) * rms
        return out.reshape(x.shape).to(x.dtype), None

    def gmse(self) -> float:
        return _relative_mse(self, gaussian_sample(n=1 << 16))

    @property
    def label(self):
        return f"vq{self.dim}d{self.bits}b"


@lru_cache(maxsize=None)
def _kmeans_codebook(dim: int, k: int, n: int = 1 << 15, iters: int = 30, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, dim, generator=g, dtype=torch.float64)
    cb = data[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(data, cb).argmin(-1)
        sums = torch.zeros_like(cb).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k).to(data.dtype).unsqueeze(-1)
        cb = torch.where(counts > 0, sums / counts.clamp_min(1), cb)
    return cb


FORMATS = {"Dense": Dense, "Int": Int, "Fp4": Fp4, "Sparse": Sparse, "SparseInt": SparseInt, "VQ": VQ}


def format_from_dict(spec: dict) -> Format:
    spec = dict(spec)
    return FORMATS[spec.pop("name")](**spec)


def parse_format(spec) -> Format:
    """A format from a ``Format``, a ``to_dict()`` mapping or a short string: ``dense``, ``int4``,
    ``int4g128``, ``fp4``, ``sparse0.5``, ``sparse2:4``, ``sparse0.5+int4``, ``vq2d2b``."""
    if isinstance(spec, Format):
        return spec
    if isinstance(spec, dict):
        return format_from_dict(spec)
    s = str(spec).strip().lower()
    if s == "dense":
        return Dense()
    if s == "fp4":
        return Fp4()
    if m := re.fullmatch(r"int(\d+)(?:g(\d+))?", s):
        return Int(int(m[1]), int(m[2]) if m[2] else None)
    if m := re.fullmatch(r"sparse(\d+):(\d+)", s):
        return Sparse(pattern=f"{m[1]}:{m[2]}")
    if m := re.fullmatch(r"sparse([0-9.]+)\+int(\d+)", s):
        return SparseInt(float(m[1]), int(m[2]))
    if m := re.fullmatch(r"sparse([0-9.]+)", s):
        return Sparse(float(m[1]))
    if m := re.fullmatch(r"vq(\d+)d(\d+)b", s):
        return VQ(int(m[1]), int(m[2]))
    raise ValueError(f"format {spec!r} is invalid: expected dense, intB[gG], fp4, sparseD, sparseN:M, "
                     f"sparseD+intB or vqDdBb")
