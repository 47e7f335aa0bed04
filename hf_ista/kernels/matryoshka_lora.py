"""MatryoshkaLoRA's adapter path, ``out = base + scale * (x A_r^T diag(d)) B_r^T``, forward and
backward: each Triton kernel next to its torch twin (same signature, same numbers up to the order
of floating-point sums).

In PEFT's layout ``A`` is ``(r, in)`` and ``B`` is ``(out, r)``; the layer passes the rank-``r'``
prefixes ``a = A[:r']`` (``(r', in)``) and ``b = B[:, :r']`` (``(out, r')``, a strided view, never
copied) and the diagonal ``d`` of length ``r'``: the fixed ``P[:r']`` while training, or
``s(r') * 1`` when serving rank ``r'``. Three primitives cover both passes:

* :func:`project` — ``h = (x @ w) * c``, ``w`` ``(K, R)`` with any strides, ``c`` a per-column
  scale (``d * scale``). Forward: ``hs = x a^T (d scale)``; backward: ``dh = g b (d scale)``.
* :func:`expand` — ``out = base + h @ w`` (``base`` optional). Forward: ``out = base + hs b^T``;
  backward: ``grad_x = dh a``.
* :func:`weight_grad` — ``out = p^T @ q``, written through ``out``'s strides. Backward:
  ``grad_a = dh^T x`` and ``grad_b = g^T hs`` (written as the transpose of ``hs^T g``).

The rank is small (at most a few hundred), so a whole rank block lives in registers: the Triton
kernels tile the token and feature dimensions and keep ``R`` in one block (padded to 16 for
``tl.dot``). Accumulation is fp32 whatever the input dtype; fp32 products use IEEE fp32, not TF32,
so the GPU numbers follow the torch twins (cuBLAS fp32 is not TF32 by default either).

:func:`matryoshka_lora` is the autograd entry point; its backward calls the same primitives, so
the kernel / twin choice (:mod:`hf_ista.kernels.backend`) holds for both passes.
"""
from __future__ import annotations

import torch

from .backend import device_of, triton_available, use_triton

# ---------------------------------------------------------------------------------------------
# torch twins
# ---------------------------------------------------------------------------------------------


def project_torch(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(x @ w) * c``: ``x`` ``(M, K)``, ``w`` ``(K, R)``, ``c`` ``(R,)`` fp32; result in ``x``'s dtype."""
    return (torch.mm(x, w).float() * c).to(x.dtype)


def expand_torch(h: torch.Tensor, w: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``base + h @ w`` (``h @ w`` alone when ``base`` is None)."""
    return torch.mm(h, w) if base is None else torch.addmm(base, h, w)


def weight_grad_torch(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = p^T @ q``: ``p`` ``(M, R)``, ``q`` ``(M, C)``, ``out`` ``(R, C)`` (any strides)."""
    return out.copy_(torch.mm(p.t(), q))


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _project_kernel(x_ptr, w_ptr, c_ptr, out_ptr, M, K, R,
                        stride_xm, stride_xk, stride_wk, stride_wr, stride_om, stride_or,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # One program: BLOCK_M rows of x times all of w (R fits one block), scaled per column.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wr,
                        mask=(ks[:, None] < K) & (cols[None, :] < R), other=0.0)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        c = tl.load(c_ptr + cols, mask=cols < R, other=0.0)
        acc = acc * c[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_or,
                 acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < R))

    @triton.jit
    def _expand_kernel(h_ptr, w_ptr, base_ptr, out_ptr, M, N, R,
                       stride_hm, stride_hr, stride_wr, stride_wn, stride_bm, stride_bn, stride_om, stride_on,
                       HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
        # One program: a BLOCK_M x BLOCK_N tile of the output; the rank sum is one tl.dot.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + rs[None, :] * stride_hr,
                    mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        w = tl.load(w_ptr + rs[:, None] * stride_wr + cols[None, :] * stride_wn,
                    mask=(rs[:, None] < R) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(h, w, input_precision="ieee")
        live = (rows[:, None] < M) & (cols[None, :] < N)
        if HAS_BASE:
            base = tl.load(base_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bn, mask=live, other=0.0)
            acc += base.to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _weight_grad_kernel(p_ptr, q_ptr, out_ptr, M, R, C,
                            stride_pm, stride_pr, stride_qm, stride_qc, stride_or, stride_oc,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        # One program: all R rows of p^T q for BLOCK_C columns, reducing over the M tokens.
        rs = tl.arange(0, BLOCK_R)
        cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for start in range(0, M, BLOCK_M):
            ms = start + tl.arange(0, BLOCK_M)
            pt = tl.load(p_ptr + rs[:, None] * stride_pr + ms[None, :] * stride_pm,
                         mask=(rs[:, None] < R) & (ms[None, :] < M), other=0.0)
            q = tl.load(q_ptr + ms[:, None] * stride_qm + cols[None, :] * stride_qc,
                        mask=(ms[:, None] < M) & (cols[None, :] < C), other=0.0)
            acc = tl.dot(pt, q, acc, input_precision="ieee")
        tl.store(out_ptr + rs[:, None] * stride_or + cols[None, :] * stride_oc,
                 acc.to(out_ptr.dtype.element_ty), mask=(rs[:, None] < R) & (cols[None, :] < C))


_BLOCK_M, _BLOCK_K, _BLOCK_N = 32, 32, 32
_MAX_RANK = 256  # one rank block in registers; larger ranks take the torch twin


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def project_triton(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    R = w.shape[1]
    out = torch.empty(M, R, device=x.device, dtype=x.dtype)
    _project_kernel[(triton.cdiv(M, _BLOCK_M),)](
        x, w, c, out, M, K, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_R=_rank_block(R),
    )
    return out


def expand_triton(h: torch.Tensor, w: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    M, R = h.shape
    N = w.shape[1]
    out = torch.empty(M, N, device=h.device, dtype=h.dtype)
    src = out if base is None else base  # never read when HAS_BASE is False
    _expand_kernel[(triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))](
        h, w, src, out, M, N, R, h.stride(0), h.stride(1), w.stride(0), w.stride(1), src.stride(0), src.stride(1),
        out.stride(0), out.stride(1), HAS_BASE=base is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_R=_rank_block(R),
    )
    return out


def weight_grad_triton(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    M, R = p.shape
    C = q.shape[1]
    _weight_grad_kernel[(triton.cdiv(C, _BLOCK_N),)](
        p, q, out, M, R, C, p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_N, BLOCK_R=_rank_block(R),
    )
    return out


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def _triton_for(t: torch.Tensor, rank: int) -> bool:
    return use_triton(t) and rank <= _MAX_RANK


def project(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if not _triton_for(x, w.shape[1]):
        return project_torch(x, w, c)
    with device_of(x):
        return project_triton(x, w, c)


def expand(h: torch.Tensor, w: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    if not _triton_for(h, h.shape[1]):
        return expand_torch(h, w, base)
    with device_of(h):
        return expand_triton(h, w, base)


def weight_grad(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if not _triton_for(p, p.shape[1]):
        return weight_grad_torch(p, q, out)
    with device_of(p):
        return weight_grad_triton(p, q, out)


class MatryoshkaLoraFunction(torch.autograd.Function):
    """``base + scale * ((x a^T) * d) b^T`` with a backward built from the same primitives.

    ``x`` ``(M, in)``, ``a`` ``(r', in)``, ``b`` ``(out, r')``, ``base`` ``(M, out)``, ``d`` ``(r',)``
    (not differentiated: P is fixed), ``scale`` a float. All tensors but ``d`` share one dtype.
    """

    @staticmethod
    def forward(ctx, x, a, b, base, d, scale):
        c = d.float() * scale
        hs = project(x, a.t(), c)  # (M, r'): the scaled low-rank code of each token
        out = expand(hs, b.t(), base)
        ctx.save_for_backward(x, a, b, hs, c)
        return out

    @staticmethod
    def backward(ctx, g):
        x, a, b, hs, c = ctx.saved_tensors
        g = g.contiguous()
        grad_x = grad_a = grad_b = None
        dh = project(g, b, c)  # d out / d hs, times the diagonal: (M, r')
        if ctx.needs_input_grad[0]:
            grad_x = expand(dh, a, None)
        if ctx.needs_input_grad[1]:
            grad_a = weight_grad(dh, x, torch.empty_like(a, memory_format=torch.contiguous_format))
        if ctx.needs_input_grad[2]:
            # g^T hs written as the transpose of hs^T g, straight into (out, r') layout
            grad_b = torch.empty(b.shape, device=b.device, dtype=b.dtype)
            weight_grad(hs, g, grad_b.t())
        return grad_x, grad_a, grad_b, g, None, None


def matryoshka_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, d: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``base + scale * x a^T diag(d) b^T`` for ``x`` of any leading shape (``(..., in)``).

    ``base`` is the base layer's output ``(..., out)``; ``a = A[:r']``, ``b = B[:, :r']`` and ``d``
    of length ``r'``. Differentiable in ``x``, ``a``, ``b`` and ``base``.
    """
    if a.shape[0] != b.shape[1] or a.shape[0] != d.shape[0]:
        raise ValueError(f"rank mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, d {tuple(d.shape)}; "
                         f"expected a (r, in), b (out, r), d (r,)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    base2 = base.reshape(-1, base.shape[-1])
    out = MatryoshkaLoraFunction.apply(x2, a, b, base2, d, float(scale))
    return out.view(*lead, out.shape[-1])
