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


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], iterations: int = 20,
                           tol: float = 1e-4, seed: int = 0, progress: bool = False) -> dict:
    """Power iteration: v ← Hv/‖Hv‖, eigenvalue estimate vᵀHv (the eigenvalue of largest magnitude).
    Stops after ``iterations`` HVPs or when the estimate changes by less than ``tol`` relative."""
    from tqdm.auto import tqdm

    if iterations < 1:
        raise ValueError(f"iterations={iterations!r} is invalid: expected an integer >= 1")
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in params]
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vector))
    vector = [v / norm for v in vector]
    eigenvalue, steps = float("nan"), 0
    for steps in tqdm(range(1, iterations + 1), desc="probe sharpness", disable=not progress):
        hv = hessian_vector_product(loss_fn, params, vector)
        estimate = float(sum((h.double() * v.double()).sum() for h, v in zip(hv, vector)))
        norm = torch.sqrt(sum((h.double() ** 2).sum() for h in hv))
        if norm == 0:
            eigenvalue = 0.0
            break
        vector = [h / norm for h in hv]
        converged = abs(estimate - eigenvalue) <= tol * abs(estimate)
        eigenvalue = estimate
        if converged:
            break
    return {"top_eigenvalue": eigenvalue, "iterations": steps}


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
