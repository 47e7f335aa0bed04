"""EFCP (arXiv 2306.06098): full-matrix preconditioners over a window of error-feedback compressed
gradients — :class:`SparseMFAC` and :class:`SparseGGT`.

Every step, for the gradient ``g`` of *all* parameters together (``d`` = the total size):

1. ``acc = e + g``; ``c = TopK(acc)`` (density ``density``, per chunk of <= 32768 elements of each
   parameter); ``e = acc - c``                                          (``kernels.efcp.compress``)
2. ``c`` replaces the oldest row of the ring buffer ``G`` (``m`` rows, sparse: indices + values);
   the Gram matrix ``G Gᵀ`` (``m×m``) gets its new row and column ``G·c`` (``row_dots``), so it
   is maintained incrementally, never recomputed.
3. the update direction ``u`` is a combination of the window rows plus a multiple of ``c``
   (``combine_rows``), from an ``m×m`` problem solved in float64:

   * M-FAC, ``F̂ = λI + (1/m) Σ c_i c_iᵀ``: ``u = F̂⁻¹c = λ⁻¹ (c − Gᵀ (λ m I + G Gᵀ)⁻¹ G c)``
     (Woodbury; equal to ``λ⁻¹c − λ⁻² Gᵀ (m I + λ⁻¹ G Gᵀ)⁻¹ G c``), one Cholesky solve.
   * GGT: ``G Gᵀ = V Σ² Vᵀ``, ``U_r = Gᵀ V Σ⁻¹``;
     ``u = U_r [diag(1/(σ+ε)) − I/ε] U_rᵀ c + c/ε``, i.e. the window rows combined with
     ``w = V diag((1/(σ+ε) − 1/ε)/σ²) Vᵀ G c``, plus ``c/ε``.

   ``G c`` is the Gram's new column: the preconditioned vector is the compressed gradient ``c``,
   as in the authors' code, so it costs nothing more.
4. optional momentum ``b ← μ b + u`` (``u`` when ``μ = 0``); ``p ← p (1 − lr·wd) − lr·b`` with
   each parameter's own group's ``lr``, ``weight_decay`` and ``momentum``.

Design: *one global preconditioner* over every parameter of every group, as in the paper (the
Gram of the concatenated gradient is the sum of the parameters' Grams). The window is stored as
per-parameter slices — each parameter's state holds its own ``indices``, ``values`` and ``error``
— and the shared ``m×m`` ``gram`` and the global ``step`` live in the state of the *anchor*, the
first non-empty parameter of the first group: only ``state[param]`` and ``param_groups`` are saved,
so everything round-trips through ``state_dict``. ``m``, ``damp`` / ``eps`` are global and must be
the same in every group; ``density`` may differ per group. The rows of the window that are not
filled yet are zero (``1/m`` is kept, as in the authors' code). A parameter whose gradient is
``None`` enters the window with a zero gradient (its error feedback goes on) and is not moved; if
any gradient holds NaN or inf, or none exists, the whole step is skipped (the preconditioner is
global).

Host syncs in ``step``: the base class's one NaN/inf check; M-FAC's ``cholesky_ex`` has none; GGT's
``torch.linalg.eigh`` may synchronise on CUDA (not measured: no GPU was available).

State bytes per parameter of ``d`` elements at density ``ρ``: ``8·m·ρ·d`` (window: int32 + fp32)
``+ 4·d`` (error) ``[+ 4·d`` momentum``]``, plus ``4·m²`` for the Gram once. ``density=1``
stores dense rows (``4·m·d``, no indices) and no error: the dense method.
"""
from __future__ import annotations

import torch

from ..kernels import efcp as K
from ._base import IstaOptimizer, check_arg

WINDOW_KEYS = frozenset({"indices", "values", "error"})
ANCHOR_KEYS = WINDOW_KEYS | {"gram", "step"}


def _key_sets() -> tuple[frozenset[str], ...]:
    return tuple(keys | extra for keys in (WINDOW_KEYS, ANCHOR_KEYS) for extra in (frozenset(), {"momentum"}))


class _EFCP(IstaOptimizer):
    """The shared machinery: compressor, sparse ring buffer, incremental Gram, the update.
    Subclasses define ``_coefficients(gram, row, group) -> (alpha, w)``, the update
    ``u = alpha·c + Gᵀ w`` from the ``m×m`` problem."""

    state_keys = _key_sets()
    _global_keys: tuple[str, ...] = ("m",)

    def _check_group(self, group: dict) -> None:
        lr, m, density = group["lr"], group["m"], group["density"]
        check_arg("lr", lr, isinstance(lr, (int, float)) and lr > 0, "a number > 0")
        check_arg("m", m, isinstance(m, int) and not isinstance(m, bool) and m >= 1, "an integer >= 1")
        check_arg("density", density, isinstance(density, (int, float)) and 0 < density <= 1, "a number in (0, 1]")
        mom, wd = group["momentum"], group["weight_decay"]
        check_arg("momentum", mom, isinstance(mom, (int, float)) and 0 <= mom < 1, "a number in [0, 1)")
        check_arg("weight_decay", wd, isinstance(wd, (int, float)) and wd >= 0, "a number >= 0")
        for p in group["params"]:
            check_arg("params", f"tensor of dtype {p.dtype}", p.is_floating_point(), "floating-point tensors")
        if len(self.param_groups) > 1:  # one preconditioner for all groups: its shape is global
            first = self.param_groups[0]
            for key in self._global_keys:
                check_arg(key, group[key], group[key] == first[key],
                          f"the same value in every param group ({first[key]!r}): the preconditioner is global")

    # -- state ------------------------------------------------------------------------------------

    def _params(self) -> list[tuple[torch.Tensor, dict]]:
        return [(p, g) for g in self.param_groups for p in g["params"] if p.numel()]

    def _layout(self, p: torch.Tensor, group: dict) -> K.Layout:
        return K.layout(p.numel(), group["density"])

    def _init_state(self, p: torch.Tensor, group: dict, anchor: bool) -> dict:
        lay, m = self._layout(p, group), group["m"]
        state = self.state[p]
        if lay.dense:  # density 1: dense rows, no indices, no error (it stays 0)
            state["indices"] = torch.zeros(0, dtype=lay.index_dtype, device=p.device)
            state["error"] = torch.zeros(0, dtype=torch.float32, device=p.device)
        else:
            state["indices"] = torch.zeros(m, lay.n_chunks, lay.k_chunk, dtype=lay.index_dtype, device=p.device)
            state["error"] = torch.zeros(lay.padded, dtype=torch.float32, device=p.device)
        state["values"] = torch.zeros(m, lay.n_chunks, lay.k_chunk, dtype=torch.float32, device=p.device)
        if group["momentum"] > 0:
            state["momentum"] = torch.zeros(lay.padded, dtype=torch.float32, device=p.device)
        if anchor:
            state["gram"] = torch.zeros(m, m, dtype=torch.float32, device=p.device)
            state["step"] = 0
        return state

    def _state_shapes(self, p: torch.Tensor, group: dict, keys) -> dict:
        lay, m = self._layout(p, group), group["m"]
        shapes = {"values": (m, lay.n_chunks, lay.k_chunk)}
        if lay.dense:
            shapes.update(indices=(0,), error=(0,))
        else:
            shapes.update(indices=(m, lay.n_chunks, lay.k_chunk), error=(lay.padded,))
        if "momentum" in keys:
            shapes["momentum"] = (lay.padded,)
        if "gram" in keys:
            shapes["gram"] = (m, m)
        return shapes

    # -- the step ---------------------------------------------------------------------------------

    def _update_all(self, work: list[tuple[torch.Tensor, dict]]) -> None:
        params = self._params()
        with_grad = sum(1 for p, _ in params if p.grad is not None)
        if not with_grad or len(work) < with_grad:  # no gradient, or one is not finite: skip the global step
            return
        anchor = params[0][0]
        for i, (p, group) in enumerate(params):
            if not self.state[p]:
                self._init_state(p, group, anchor=i == 0)
            elif group["momentum"] > 0 and "momentum" not in self.state[p]:
                self.state[p]["momentum"] = torch.zeros(self._layout(p, group).padded, dtype=torch.float32,
                                                        device=p.device)
        top = self.state[anchor]
        gram = top["gram"]
        m = gram.shape[0]
        top["step"] += 1
        row = (top["step"] - 1) % m

        # 1-2: compress every parameter's gradient into ring row ``row``; the Gram's new row G·c.
        dots = torch.zeros(m, dtype=torch.float32, device=gram.device)
        cs = []
        for p, group in params:
            state = self.state[p]
            values, indices, error = state["values"], state["indices"], state["error"]
            chunk = self._layout(p, group).chunk  # load_state_dict checked the shapes against it
            c = torch.empty(values.shape[1] * chunk, dtype=torch.float32, device=p.device)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            K.compress(grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().view(-1), error,
                       indices, values, c, row, chunk)
            part = torch.empty(m, dtype=torch.float32, device=p.device)
            K.row_dots(indices, values, c, part)
            dots += part.to(gram.device)
            cs.append(c)
        gram[row] = dots
        gram[:, row] = dots

        # 3: the m×m problem, in float64.
        alpha, w = self._coefficients(gram, row, self.param_groups[0])
        w32 = w.to(torch.float32)
        for (p, group), c in zip(params, cs):
            if p.grad is None:  # as in torch's optimizers: a parameter without gradient is not moved
                continue
            state = self.state[p]
            u = c.mul_(alpha)
            K.combine_rows(state["indices"], state["values"], w32.to(p.device), u)
            if group["momentum"] > 0:
                u = state["momentum"].mul_(group["momentum"]).add_(u)
            self._apply(p, u[: p.numel()], group)

    @staticmethod
    def _apply(p: torch.Tensor, u: torch.Tensor, group: dict) -> None:
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        x = p.detach().reshape(-1).float()
        new = torch.add(x * decay if decay != 1 else x, u, alpha=-lr)  # in fp32, then one cast
        p.copy_(new.view_as(p))

    # -- for tests and benchmarks -----------------------------------------------------------------

    def window_bytes(self) -> int:
        """Bytes of the ring buffer alone (indices + values of every parameter)."""
        return sum(self.state[p][k].numel() * self.state[p][k].element_size()
                   for p, _ in self._params() if self.state[p] for k in ("indices", "values"))


class SparseMFAC(_EFCP):
    """M-FAC (the dynamic algorithm's Woodbury form) over a window of top-k compressed gradients
    with error feedback; ``density=1`` is dense M-FAC.

    Args:
        lr: learning rate (> 0); the direction is ``F̂⁻¹c``, Newton-like: it is about ``m/‖g‖``
            times a gradient, so learning rates are far below SGD's; 0.01 (dense) to 0.03 (1 %) were
            best in ``benchmarks/efcp.py``'s sweep on the tiny Llama.
        m: window size (>= 1; 1024 in the paper).
        density: fraction of each gradient kept in the window, in (0, 1] (default 1 %).
        damp: the damping ``λ`` of ``F̂ = λI + (1/m) Σ c_i c_iᵀ`` (> 0; the paper uses 1e-4..1e-7).
        momentum: heavy-ball momentum on the preconditioned update, in [0, 1).
        weight_decay: decoupled, as in AdamW (>= 0).
    """

    _global_keys = ("m", "damp")

    def __init__(self, params, lr: float = 3e-2, m: int = 32, density: float = 0.01, damp: float = 1e-6,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, m=m, density=density, damp=damp, momentum=momentum,
                                      weight_decay=weight_decay))

    def _check_group(self, group: dict) -> None:
        damp = group["damp"]
        check_arg("damp", damp, isinstance(damp, (int, float)) and damp > 0, "a number > 0")
        super()._check_group(group)

    def _coefficients(self, gram, row, group):
        lam, m = group["damp"], gram.shape[0]
        a = gram.double()
        a.diagonal().add_(lam * m)
        factor, _ = torch.linalg.cholesky_ex(a)  # no host sync: SPD by construction (λm > 0)
        v = torch.cholesky_solve(gram[:, row].double()[:, None], factor)[:, 0]
        return 1.0 / lam, -v / lam


class SparseGGT(_EFCP):
    """GGT (full-matrix AdaGrad over a window) on top-k compressed gradients with error feedback;
    ``density=1`` is dense GGT.

    Args:
        lr: learning rate (> 0); the direction has about unit norm in the window's span, so the
            best lr of ``benchmarks/efcp.py``'s sweep on the tiny Llama was 0.3.
        m: window size (>= 1).
        density: fraction of each gradient kept in the window, in (0, 1].
        eps: ``ε`` of ``U_r [diag(1/(σ+ε)) − I/ε] U_rᵀ c + c/ε`` (> 0).
        momentum, weight_decay: as for :class:`SparseMFAC`.
        rcond: singular values with ``σ² <= rcond · max σ²`` are left out of ``U_r`` (their
            directions get ``1/ε``, as every direction outside the window does); default 1e-10.
    """

    _global_keys = ("m", "eps", "rcond")

    def __init__(self, params, lr: float = 0.3, m: int = 32, density: float = 0.01, eps: float = 1e-4,
                 momentum: float = 0.0, weight_decay: float = 0.0, rcond: float = 1e-10):
        super().__init__(params, dict(lr=lr, m=m, density=density, eps=eps, momentum=momentum,
                                      weight_decay=weight_decay, rcond=rcond))

    def _check_group(self, group: dict) -> None:
        eps, rcond = group["eps"], group["rcond"]
        check_arg("eps", eps, isinstance(eps, (int, float)) and eps > 0, "a number > 0")
        check_arg("rcond", rcond, isinstance(rcond, (int, float)) and 0 <= rcond < 1, "a number in [0, 1)")
        super()._check_group(group)

    def _coefficients(self, gram, row, group):
        eps = group["eps"]
        sigma2, vecs = torch.linalg.eigh(gram.double())
        keep = sigma2 > group["rcond"] * sigma2.max().clamp_min(0.0)
        keep &= sigma2 > 0
        s2 = torch.where(keep, sigma2, 1.0)
        scale = torch.where(keep, (1.0 / (s2.sqrt() + eps) - 1.0 / eps) / s2, 0.0)
        w = vecs @ (scale * (vecs.T @ gram[:, row].double()))
        return 1.0 / eps, w
