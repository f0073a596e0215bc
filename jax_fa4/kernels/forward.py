"""CuTe DSL launcher around FA4's `FlashAttentionForwardSm90`, and its compilation.

This module imports cutlass and flash_attn: only `compile.py` imports it, and only
when a kernel object is missing from the cache.  The launcher's argument convention
is described (and computed, without cutlass) in forward_abi.py; the FFI handler in
csrc/ supplies it.
"""
from __future__ import annotations

import os

from .config import ForwardVariant
from .forward_abi import operands, size_dims

# Compile for Hopper even on hosts without a GPU.  Must precede the first cutlass import.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cuda.bindings.driver as cuda  # noqa: E402
import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32, Int32, Int64  # noqa: E402
from cutlass.cute.runtime import make_ptr  # noqa: E402
from flash_attn.cute import utils as fa_utils  # noqa: E402
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90  # noqa: E402

from .forward_hdim512 import (  # noqa: E402
    FlashAttentionForwardSm90SingleQK,
    FlashAttentionForwardSm90SplitPV,
)
from .forward_hdim512_splitk import FlashAttentionForwardSm90SplitK  # noqa: E402

_DTYPES = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}
_KERNELS = {"fa4": FlashAttentionForwardSm90, "split_k": FlashAttentionForwardSm90SplitK,
            "split_pv": FlashAttentionForwardSm90SplitPV,
            "single_qk": FlashAttentionForwardSm90SingleQK}


def _fa4_kernel(v: ForwardVariant) -> FlashAttentionForwardSm90:
    t = v.tile
    score_mod = fa_utils.create_softcap_scoremod(v.softcap) if v.softcap is not None else None
    return _KERNELS[t.design](
        _DTYPES[v.dtype],
        v.head_dim,
        v.head_dim_v,
        v.qhead_per_kvhead,
        is_causal=v.mask == "causal",
        is_local=v.mask == "local",
        pack_gqa=v.pack_gqa,
        tile_m=t.tile_m,
        tile_n=t.tile_n,
        num_stages=t.num_stages,
        num_threads=384,  # recomputed by the kernel from its tiled MMA
        Q_in_regs=False,
        intra_wg_overlap=t.intra_wg_overlap,
        mma_pv_is_rs=t.mma_pv_is_rs,
        score_mod=score_mod,
        paged_kv_non_tma=v.kv_layout == "paged" and not v.paged_tma,
    )


def _row_major(ptr, dims, aligned: bool):
    """A contiguous tensor of shape `dims` with 64-bit strides (as FA4's own tensors
    from DLPack have: its varlen TMA views offset pointers by 2**30-odd rows, which
    overflows 32-bit stride arithmetic).  `aligned` asserts that every stride but the
    minor one is a multiple of 8 elements (16 bytes), as TMA descriptors need (true for
    q/k/v/o: their minor dim is a head dim, a multiple of 8)."""
    strides, acc = [], 1
    for d in reversed(dims):
        strides.append(acc)
        acc = acc * (Int64(d) if not isinstance(d, int) else d)
        if aligned and not isinstance(acc, int):
            acc = cute.assume(acc, divby=8)
    return cute.make_tensor(ptr, cute.make_layout(tuple(dims), stride=tuple(reversed(strides))))


def _tensors(v: ForwardVariant, args):
    """Plain Python (not staged by the DSL): the launcher's flat arguments -> tensors."""
    ops = operands(v)
    n_ops = len(ops)
    ptrs, o_ptr, lse_ptr = args[:n_ops], args[n_ops], args[n_ops + 1]
    sizes = args[n_ops + 2 :]
    t, at = {}, 0
    for i, (name, rank) in enumerate(ops):
        dims = list(sizes[at : at + rank])
        at += rank
        if name in ("q", "k", "v"):  # head dims are compile-time constants
            dims[-1] = v.head_dim_v if name == "v" else v.head_dim
        t[name] = _row_major(ptrs[i], dims, aligned=name in ("q", "k", "v"))
    q_dims = list(t["q"].shape)
    t["o"] = _row_major(o_ptr, q_dims[:-1] + [v.head_dim_v], aligned=True)
    # lse: (b, h, s_q) for dense q, (h, total_q) for packed q.
    lse_dims = [q_dims[0], q_dims[2], q_dims[1]] if v.q_layout == "dense" else q_dims[1::-1]
    t["lse"] = _row_major(lse_ptr, lse_dims, aligned=False)
    return t


def _make_launcher(v: ForwardVariant, fa: FlashAttentionForwardSm90 | None = None):
    """The `@cute.jit` launcher of `v`: FA4's kernel object `fa` (default: _fa4_kernel's
    for `v`) called on the tensors of this module's argument convention."""
    fa = _fa4_kernel(v) if fa is None else fa
    local = v.mask == "local"

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # args: operand pointers, o, lse, every operand dimension, wl, wr, scale.
        wl, wr, scale = args[-3], args[-2], args[-1]
        t = _tensors(v, args[:-3])
        fa(
            t["q"], t["k"], t["v"], t["o"], t["lse"], scale,
            t.get("cu_seqlens_q"), t.get("cu_seqlens_k"), t.get("seqused_q"),
            t.get("seqused_k"), t.get("page_table"),
            wl if cutlass.const_expr(local and v.window_left) else None,
            wr if cutlass.const_expr(local and v.window_right) else None,
            t.get("sinks"),
            stream=stream,
        )

    return launch


_PTR_ALIGN = {"q": 16, "k": 16, "v": 16}


def compile_forward(v: ForwardVariant) -> bytes:
    """Compiles `v` for sm_90a and returns the ELF object holding launcher and cubin."""
    return compile_launcher(_make_launcher(v), v, v.symbol)


def compile_launcher(launch, v: ForwardVariant, symbol: str) -> bytes:
    """Compiles a `@cute.jit` launcher taking this module's argument convention for `v`
    (operand pointer types and alignments, int32 sizes, window and scale scalars) and
    returns the ELF object exporting it as `symbol`."""
    dt = _DTYPES[v.dtype]
    gmem = cute.AddressSpace.gmem
    ptrs = []
    for name, _ in operands(v):
        dtype = dt if name in ("q", "k", "v") else (Float32 if name == "sinks" else Int32)
        align = _PTR_ALIGN.get(name, 4)
        ptrs.append(make_ptr(dtype, align, gmem, assumed_align=align))
    ptrs += [make_ptr(dt, 16, gmem, assumed_align=16), make_ptr(Float32, 4, gmem, assumed_align=4)]
    sizes = [Int32(1) for _ in size_dims(v)]
    compiled = cute.compile(launch, cuda.CUstream(0), *ptrs, *sizes, Int32(0), Int32(0),
                            Float32(1.0))
    return compiled.dump_to_object(symbol)
