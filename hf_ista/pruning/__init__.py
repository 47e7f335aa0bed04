"""Post-training pruning: magnitude, Wanda, one-shot OBS (SparseGPT-style) and I-OBS, one API.

    from hf_ista.pruning import prune
    report = prune(model, calibration=dataset, sparsity=0.5, pattern="2:4", method="iobs", iterations=3)
    print(report.table())

Layout: ``calibration.py`` (data in, Hessians out, layer order), ``masks.py`` (patterns, the
magnitude and Wanda masks), ``obs.py`` (the OBS and I-OBS solvers), ``pruner.py`` (the loop over
layers), ``report.py`` (what comes back). The kernels are in :mod:`hf_ista.kernels.pruning`.
"""
from .masks import Pattern, parse_pattern
from .obs import iobs_prune, iobs_step, obs_project, obs_prune, solve_on_support
from .pruner import METHODS, prune, prune_layer, select_targets
from .report import LayerReport, PruningReport

__all__ = ["METHODS", "LayerReport", "Pattern", "PruningReport", "iobs_prune", "iobs_step", "obs_project",
           "obs_prune", "parse_pattern", "prune", "prune_layer", "select_targets", "solve_on_support"]
