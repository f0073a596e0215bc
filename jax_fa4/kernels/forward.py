"""CuTe DSL launcher around FA4's `FlashAttentionForwardSm90`, and its compilation.

This module imports cutlass and flash_attn: only `compile.py` imports it, and only
when a kernel object is missing from the cache.

Launcher ABI (LAUNCHER_ABI in config.py; the FFI handler in csrc/ supplies it):
    stream,
    q, k, v, [sinks], o, lse          -- device pointers: the custom call's operands,
                                         then its results
    b, s_q, h_q, s_k, h_k             -- int32, read from the buffers' dimensions
    window_left, window_right         -- int32 (ignored unless the variant is local)
    scale                             -- float32 softmax scale
with q (b, s_q, h_q, d), k (b, s_k, h_k, d), v (b, s_k, h_k, dv), o (b, s_q, h_q, dv)
contiguous, lse (b, h_q, s_q) float32, sinks (h_q,) float32.
"""
from __future__ import annotations

import os

from .config import ForwardVariant

# Compile for Hopper even on hosts without a GPU.  Must precede the first cutlass import.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cuda.bindings.driver as cuda  # noqa: E402
import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32, Int32  # noqa: E402
from cutlass.cute.runtime import make_ptr  # noqa: E402
from flash_attn.cute import utils as fa_utils  # noqa: E402
from flash_attn.cute.flash_fwd_sm90 import FlashAttentionForwardSm90  # noqa: E402

_DTYPES = {"bfloat16": cutlass.BFloat16, "float16": cutlass.Float16}


def _fa4_kernel(v: ForwardVariant) -> FlashAttentionForwardSm90:
    t = v.tile
    score_mod = fa_utils.create_softcap_scoremod(v.softcap) if v.softcap is not None else None
    return FlashAttentionForwardSm90(
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
        num_threads=384,  # recomputed by the kernel from tile_m
        Q_in_regs=False,
        intra_wg_overlap=t.intra_wg_overlap,
        mma_pv_is_rs=t.mma_pv_is_rs,
        score_mod=score_mod,
    )


def _make_launcher(v: ForwardVariant):
    fa = _fa4_kernel(v)
    D, DV = v.head_dim, v.head_dim_v
    local = v.mask == "local"

    def bshd(ptr, b, s, h, d):
        # Contiguous (b, s, h, d); the assumptions let TMA descriptors see 16-byte strides.
        hd = cute.assume(h * d, divby=8)
        shd = cute.assume(s * hd, divby=8)
        return cute.make_tensor(ptr, cute.make_layout((b, s, h, d), stride=(shd, hd, d, 1)))

    def body(stream, q, k, v_, sinks, o, lse, b, sq, hq, sk, hk, wl, wr, scale):
        mQ, mK, mV = bshd(q, b, sq, hq, D), bshd(k, b, sk, hk, D), bshd(v_, b, sk, hk, DV)
        mO = bshd(o, b, sq, hq, DV)
        mLSE = cute.make_tensor(lse, cute.make_layout((b, hq, sq), stride=(hq * sq, sq, 1)))
        mSinks = (
            cute.make_tensor(sinks, cute.make_layout((hq,), stride=(1,)))
            if sinks is not None
            else None
        )
        fa(
            mQ, mK, mV, mO, mLSE, scale,
            None, None, None, None, None,  # cu_seqlens_q/k, seqused_q/k, page_table
            wl if (local and v.window_left) else None,
            wr if (local and v.window_right) else None,
            mSinks,
            stream=stream,
        )

    if v.has_sinks:

        @cute.jit
        def launch(stream: cuda.CUstream, q: cute.Pointer, k: cute.Pointer, v_: cute.Pointer,
                   sinks: cute.Pointer, o: cute.Pointer, lse: cute.Pointer,
                   b: Int32, sq: Int32, hq: Int32, sk: Int32, hk: Int32,
                   wl: Int32, wr: Int32, scale: Float32):
            body(stream, q, k, v_, sinks, o, lse, b, sq, hq, sk, hk, wl, wr, scale)

        return launch, True

    @cute.jit
    def launch(stream: cuda.CUstream, q: cute.Pointer, k: cute.Pointer, v_: cute.Pointer,
               o: cute.Pointer, lse: cute.Pointer,
               b: Int32, sq: Int32, hq: Int32, sk: Int32, hk: Int32,
               wl: Int32, wr: Int32, scale: Float32):
        body(stream, q, k, v_, None, o, lse, b, sq, hq, sk, hk, wl, wr, scale)

    return launch, False


def compile_forward(v: ForwardVariant) -> bytes:
    """Compiles `v` for sm_90a and returns the ELF object holding launcher and cubin."""
    launch, has_sinks = _make_launcher(v)
    dt = _DTYPES[v.dtype]
    gmem = cute.AddressSpace.gmem
    ptr = lambda dtype, align: make_ptr(dtype, align, gmem, assumed_align=align)  # noqa: E731
    ptrs = [ptr(dt, 16), ptr(dt, 16), ptr(dt, 16)]
    if has_sinks:
        ptrs.append(ptr(Float32, 4))
    ptrs += [ptr(dt, 16), ptr(Float32, 4)]
    ints = [Int32(1)] * 7
    compiled = cute.compile(launch, cuda.CUstream(0), *ptrs, *ints, Float32(1.0))
    return compiled.dump_to_object(v.symbol)
