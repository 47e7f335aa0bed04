"""Compile every Triton kernel (MicroAdam, low-rank, DASH, MatryoshkaLoRA, pruning, EFCP, scaling formats) for an H100 (sm_90) without a GPU; print JSON
facts ``{family: {kernel: {"cubin_bytes": ..., "ops": [...]}}}`` and, under ``"defined"``, the
names of the Triton kernels (``*_kernel``, not the device helpers) each family's module defines,
so a new kernel cannot be forgotten here.

Run without TRITON_INTERPRET (the interpreter replaces the JIT functions)."""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_ista.kernels import dash, efcp, lowrank, matryoshka_lora, microadam, pruning, scaling

MICROADAM = {
    "_select_topk_kernel": ({"a_ptr": "*fp32", "idx_ptr": "*i16", "val_ptr": "*bf16", "row_offset": "i32",
                             "chunk": "i32", "k_chunk": "i32", "BLOCK": "constexpr"}, {"BLOCK": 2048}),
    "_dequant_add_kernel": ({"grad_ptr": "*bf16", "err_ptr": "*u8", "mm_ptr": "*i16", "out_ptr": "*fp32",
                             "d": "i32", "D": "i32", "qb": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "_zero_selected_kernel": ({"a_ptr": "*fp32", "idx_ptr": "*i16", "chunk": "i32", "k_chunk": "i32",
                               "BLOCK": "constexpr"}, {"BLOCK": 128}),
    "_quantize_kernel": ({"a_ptr": "*fp32", "err_ptr": "*u8", "mm_ptr": "*i16", "D": "i32", "qb": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 32}),
    "_window_update_kernel": ({"p_ptr": "*bf16", "idx_ptr": "*i16", "val_ptr": "*bf16", "w_ptr": "*fp32",
                               "mom1_ptr": "*fp32", "mom2_ptr": "*fp32", "m": "i32", "d": "i32", "chunk": "i32",
                               "k_chunk": "i32", "lr": "fp32", "decay": "fp32", "c1": "fp32", "c2": "fp32",
                               "eps": "fp32", "n_chunks": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
}

_QUANTIZE = {"x_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*fp32", "numel": "i32", "block": "i32",
             "LEVELS": "constexpr", "PACK": "constexpr", "HALF": "constexpr"}
_DEQUANTIZE = {"g_ptr": "*fp32", "codes_ptr": "*u8", "scales_ptr": "*fp32", "out_ptr": "*fp32", "numel": "i32",
               "block": "i32", "BITS": "constexpr", "BLOCK": "constexpr"}
# "name" or "name[variant]": the kernel _name_ with one set of constexprs (block 64, as the optimizer)
LOWRANK = {
    "_row_abs_sum_kernel": ({"s_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                            {"BLOCK": 1024}),
    "_subspace_adam_kernel": ({"g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "u_ptr": "*fp32",
                               "numel": "i32", "beta1": "fp32", "beta2": "fp32", "bc1": "fp32", "bc2": "fp32",
                               "eps": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "_quantize_kernel[8bit]": (_QUANTIZE, {"LEVELS": 255, "PACK": 1, "HALF": 64}),
    "_quantize_kernel[4bit]": (_QUANTIZE, {"LEVELS": 15, "PACK": 2, "HALF": 32}),
    "_dequantize_add_kernel[8bit]": (_DEQUANTIZE, {"BITS": 8, "BLOCK": 1024}),
    "_dequantize_add_kernel[4bit]": (_DEQUANTIZE, {"BITS": 4, "BLOCK": 1024}),
}

DASH = {
    "_symmetric_ema_kernel": ({"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "k": "i32", "sxb": "i32",
                               "sxn": "i32", "sxk": "i32", "beta": "fp32", "TILE": "constexpr", "BK": "constexpr"},
                              {"TILE": 64, "BK": 32}),
    "_graft_moments_kernel": ({"g_ptr": "*fp32", "m_ptr": "*fp32", "a_ptr": "*fp32", "d_ptr": "*fp32",
                               "partial_ptr": "*fp32", "block_numel": "i32", "n_chunks": "i32", "beta_g": "fp32",
                               "beta_a": "fp32", "bc_g": "fp32", "bc_a": "fp32", "eps": "fp32", "BLOCK": "constexpr"},
                              {"BLOCK": 1024}),
}


def _matryoshka(dtype: str) -> dict:
    """The adapter-path kernels for one activation dtype (fp32 as tested, bf16 as trained on GPUs)."""
    ptr, stride = f"*{dtype}", "i32"
    project = {"x_ptr": ptr, "w_ptr": ptr, "c_ptr": "*fp32", "out_ptr": ptr, "M": "i32", "K": "i32", "R": "i32",
               **{f"stride_{s}": stride for s in ("xm", "xk", "wk", "wr", "om", "or")},
               "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"}
    expand = {"h_ptr": ptr, "w_ptr": ptr, "base_ptr": ptr, "out_ptr": ptr, "M": "i32", "N": "i32", "R": "i32",
              **{f"stride_{s}": stride for s in ("hm", "hr", "wr", "wn", "bm", "bn", "om", "on")},
              "HAS_BASE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_R": "constexpr"}
    grad = {"p_ptr": ptr, "q_ptr": ptr, "out_ptr": ptr, "M": "i32", "R": "i32", "C": "i32",
            **{f"stride_{s}": stride for s in ("pm", "pr", "qm", "qc", "or", "oc")},
            "BLOCK_M": "constexpr", "BLOCK_C": "constexpr", "BLOCK_R": "constexpr"}
    return {
        f"_project_kernel[{dtype}]": (project, {"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_R": 64}),
        f"_expand_kernel[{dtype}]": (expand, {"HAS_BASE": True, "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 64}),
        f"_weight_grad_kernel[{dtype}]": (grad, {"BLOCK_M": 32, "BLOCK_C": 32, "BLOCK_R": 64}),
    }


MATRYOSHKA = {**_matryoshka("fp32"), **_matryoshka("bf16")}

_SELECT_ROWS = {"w_ptr": "*fp32", "d_ptr": "*fp32", "counts_ptr": "*i32", "prune_ptr": "*i8", "cols": "i32",
                "SQUARE": "constexpr", "BLOCK": "constexpr"}
_SELECT_NM = {"w_ptr": "*fp32", "d_ptr": "*fp32", "prune_ptr": "*i8", "cols": "i32", "N": "constexpr",
              "M": "constexpr", "SQUARE": "constexpr", "GROUPS": "constexpr"}
_SWEEP = {"w_ptr": "*fp32", "u_ptr": "*fp32", "prune_ptr": "*i8", "q_ptr": "*fp32", "err_ptr": "*fp32",
          "rows": "i32", "b": "i32", "N": "constexpr", "M": "constexpr", "ROWS": "constexpr", "BLOCK": "constexpr"}
PRUNING = {
    "_select_rows_kernel[saliency]": (_SELECT_ROWS, {"SQUARE": True, "BLOCK": 128}),
    "_select_rows_kernel[scores]": (_SELECT_ROWS, {"SQUARE": False, "BLOCK": 4096}),
    "_select_nm_kernel[2:4]": (_SELECT_NM, {"N": 2, "M": 4, "SQUARE": True, "GROUPS": 64}),
    "_obs_sweep_kernel[unstructured]": (_SWEEP, {"N": 0, "M": 0, "ROWS": 16, "BLOCK": 128}),
    "_obs_sweep_kernel[2:4]": (_SWEEP, {"N": 2, "M": 4, "ROWS": 16, "BLOCK": 128}),
}

EFCP = {
    "_compress_kernel": ({"grad_ptr": "*bf16", "err_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*fp32",
                          "c_ptr": "*fp32", "row_offset": "i64", "d": "i64", "chunk": "i32", "k_chunk": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 2048}),
    "_row_dots_kernel": ({"idx_ptr": "*i32", "val_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32", "k": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "_combine_rows_kernel": ({"idx_ptr": "*i32", "val_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32",
                              "m": "i32", "n_chunks": "i32", "k_chunk": "i32", "BLOCK": "constexpr"}, {"BLOCK": 512}),
}

SCALING = {
    "_fake_quant_kernel": ({"x_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "inside_ptr": "*i8",
                            "cols": "i32", "half": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "_topk_mask_kernel": ({"x_ptr": "*fp32", "mask_ptr": "*i8", "cols": "i32", "k": "i32", "BLOCK": "constexpr"},
                          {"BLOCK": 2048}),
}

OPS = re.compile(r"\b(div\.\w+\.f32|sqrt\.\w+(?:\.\w+)*\.f32|fma\.rn\.f32|atom\.[\w.]+|w?gmma[\w.]*|mma\.sync[\w.]*)")

facts = {"defined": {}}
for family, module, kernels in (("microadam", microadam, MICROADAM), ("lowrank", lowrank, LOWRANK),
                                ("dash", dash, DASH), ("matryoshka_lora", matryoshka_lora, MATRYOSHKA),
                                ("pruning", pruning, PRUNING), ("efcp", efcp, EFCP), ("scaling", scaling, SCALING)):
    facts[family] = {}
    facts["defined"][family] = sorted(n for n, v in vars(module).items()
                                      if isinstance(v, triton.JITFunction) and n.endswith("_kernel"))
    for key, (signature, constexprs) in kernels.items():
        fn = getattr(module, key.split("[")[0])
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=getattr(module, "_EXACT", {}))
        ptx = compiled.asm["ptx"]
        facts[family][key] = {"cubin_bytes": len(compiled.asm["cubin"]), "ops": sorted(set(OPS.findall(ptx)))}
print(json.dumps(facts))
