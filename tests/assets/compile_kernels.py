"""Compile every Triton kernel (MicroAdam, low-rank, DASH, EFCP) for an H100 (sm_90) without a GPU; print JSON
facts ``{family: {kernel: {"cubin_bytes": ..., "ops": [...]}}}`` and, under ``"defined"``, the
names of the Triton kernels (``*_kernel``, not the device helpers) each family's module defines,
so a new kernel cannot be forgotten here.

Run without TRITON_INTERPRET (the interpreter replaces the JIT functions)."""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_ista.kernels import dash, efcp, lowrank, microadam

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

EFCP = {
    "_compress_kernel": ({"grad_ptr": "*bf16", "err_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*fp32",
                          "c_ptr": "*fp32", "row_offset": "i64", "d": "i64", "chunk": "i32", "k_chunk": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 2048}),
    "_row_dots_kernel": ({"idx_ptr": "*i32", "val_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32", "k": "i32",
                          "BLOCK": "constexpr"}, {"BLOCK": 1024}),
    "_combine_rows_kernel": ({"idx_ptr": "*i32", "val_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32",
                              "m": "i32", "n_chunks": "i32", "k_chunk": "i32", "BLOCK": "constexpr"}, {"BLOCK": 512}),
}

OPS = re.compile(r"\b(div\.\w+\.f32|sqrt\.\w+(?:\.\w+)*\.f32|fma\.rn\.f32|atom\.[\w.]+)")

facts = {"defined": {}}
for family, module, kernels in (("microadam", microadam, MICROADAM), ("lowrank", lowrank, LOWRANK),
                                ("dash", dash, DASH), ("efcp", efcp, EFCP)):
    facts[family] = {}
    facts["defined"][family] = sorted(n for n, v in vars(module).items()
                                      if isinstance(v, triton.JITFunction) and n.endswith("_kernel"))
    for key, (signature, constexprs) in kernels.items():
        fn = getattr(module, key.split("[")[0])
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=module._EXACT)
        ptx = compiled.asm["ptx"]
        facts[family][key] = {"cubin_bytes": len(compiled.asm["cubin"]), "ops": sorted(set(OPS.findall(ptx)))}
print(json.dumps(facts))
