"""Compile every MicroAdam Triton kernel for an H100 (sm_90) without a GPU; print JSON facts.

Run without TRITON_INTERPRET (the interpreter replaces the JIT functions)."""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_ista.kernels import microadam as K

SIGNATURES = {
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

facts = {}
for name, (signature, constexprs) in SIGNATURES.items():
    compiled = triton.compile(ASTSource(fn=getattr(K, name), signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=K._EXACT)
    ptx = compiled.asm["ptx"]
    facts[name] = {
        "cubin_bytes": len(compiled.asm["cubin"]),
        "ops": sorted(set(re.findall(r"\b(div\.\w+\.f32|sqrt\.\w+(?:\.\w+)*\.f32|fma\.rn\.f32|atom\.[\w.]+)", ptx))),
    }
print(json.dumps(facts))
