"""Sharpness: the top Hessian eigenvalue of a loss, by power iteration on Hessian-vector products
(double backward through ``torch.autograd.grad``). Models run with the math attention kernel here:
the fused CPU / flash SDPA kernels have no double backward."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor],
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector))
    return [h.detach() for h in torch.autograd.grad(dot, params, materialize_grads=True)]


def power_iteration(product: Callable[[list[torch.Tensor]], list[torch.Tensor]], like: list[torch.Tensor],
                    iterations: int, tol: float, seed: int, progress: bool = False, desc: str = "probe sharpness"):
    """Eigenvalue of largest magnitude of the symmetric operator ``product`` (v ← Av/‖Av‖, estimate
    vᵀAv), after at most ``iterations`` products or when the estimate changes by less than ``tol``
    relative. Returns ``(eigenvalue, products used)``."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in like]
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
    vector = [v / norm for v in vector]
    eigenvalue, steps = float("nan"), 0
    for steps in tqdm(range(1, iterations + 1), desc=desc, disable=not progress):
        av = product(vector)
        estimate = float(sum((a.double() * v.double()).sum() for a, v in zip(av, vector)))
        norm = torch.sqrt(sum((a.double() ** 2).sum() for a in av))
        if norm == 0:
            return 0.0, steps
        vector = [a / norm for a in av]
        converged = abs(estimate - eigenvalue) <= tol * abs(estimate)
        eigenvalue = estimate
        if converged:
            break
    return eigenvalue, steps


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], iterations: int = 20,
                           tol: float = 1e-4, seed: int = 0, progress: bool = False) -> dict:
    """The largest (algebraic) Hessian eigenvalue of ``loss_fn()`` w.r.t. ``params``: power iteration
    finds the eigenvalue of largest magnitude; if that one is negative, a second power iteration on
    H − λI (whose spectrum is then ≥ 0, largest at top − λ) finds the top one. Each phase uses at most
    ``iterations`` Hessian-vector products."""
    if iterations < 1:
        raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1")
    largest, steps = power_iteration(lambda v: hessian_vector_product(loss_fn, params, v), params, iterations,
                                     tol, seed, progress)
    top = largest
    if largest < 0:
        def shifted(v):
            return [h - largest * x for h, x in zip(hessian_vector_product(loss_fn, params, v), v)]

        gap, more = power_iteration(shifted, params, iterations, tol, seed + 1, progress, "probe sharpness (shifted)")
        top, steps = gap + largest, steps + more
    return {"top_eigenvalue": top, "largest_magnitude_eigenvalue": largest, "iterations": steps}


def probe_sharpness(model: nn.Module, batches: list[dict], iterations: int = 20, tol: float = 1e-4, seed: int = 0,
                    progress: bool = False) -> dict:
    """Top Hessian eigenvalue of the mean loss over ``batches`` w.r.t. the trainable parameters."""
    if not batches:
        raise ValueError("batches is empty: expected at least one batch with labels")
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()

    def loss_fn():
        with sdpa_kernel(SDPBackend.MATH):
            return sum(model(**batch).loss for batch in batches) / len(batches)

    try:
        return top_hessian_eigenvalue(loss_fn, params, iterations, tol, seed, progress)
    finally:
        model.train(was_training)
