"""CuTe DSL launcher for FA4's SM90 backward, and its compilation.

One launcher runs, on XLA's stream, what FA4's `_flash_attn_bwd` runs for SM90:
(GQA only) zero the float32 dK/dV accumulators; (deterministic only) zero the int32
semaphores that order the adds into dQ (and GQA's dK/dV); the preprocess
(D = rowsum(dO*O) - dLSE, LSE in log2 units, dQ accumulator zeroed); the main kernel
(dK, dV, and dQ added into its float32 accumulator); the postprocesses (dQ, and for
GQA dK/dV, converted to the input dtype and scaled; with sinks, d_sinks).  Workspaces
are XLA-allocated results of the custom call (backward_abi.py).  Imports cutlass: only
compile.py imports it.
"""
from __future__ import annotations

import os

from .backward_abi import operands, results, size_dims, workspace_dtype, workspace_names
from .backward_config import BackwardVariant

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cuda.bindings.driver as cuda  # noqa: E402
import cutlass  # noqa: E402
import cutlass.cute as cute  # noqa: E402
from cutlass import Float32, Int32  # noqa: E402
from cutlass.cute.runtime import make_ptr  # noqa: E402
from flash_attn.cute import utils as fa_utils  # noqa: E402
from flash_attn.cute.flash_bwd_postprocess import (  # noqa: E402
    FlashAttentionBackwardPostprocess,
    LearnableSinkBwdTensors,
)
from flash_attn.cute.flash_bwd_preprocess import FlashAttentionBackwardPreprocess  # noqa: E402
from flash_attn.cute.flash_bwd_sm90 import FlashAttentionBackwardSm90  # noqa: E402

from .forward import _DTYPES, _row_major  # noqa: E402

_ZERO_THREADS = 256
_ZERO_PER_THREAD = 4


@cute.kernel
def _zero_kernel(buf: cute.Tensor):
    """buf (rows, heads, n) := 0 (float32 or int32); grid (ceil(n / 1024), heads, rows)."""
    tidx, _, _ = cute.arch.thread_idx()
    bx, h, r = cute.arch.block_idx()
    for k in cutlass.range_constexpr(_ZERO_PER_THREAD):
        e = (bx * _ZERO_PER_THREAD + k) * _ZERO_THREADS + tidx
        if e < buf.shape[2]:
            buf[r, h, e] = buf.element_type(0)


def _zero(buf: cute.Tensor, stream):
    per_block = _ZERO_THREADS * _ZERO_PER_THREAD
    _zero_kernel(buf).launch(
        grid=[(buf.shape[2] + per_block - 1) // per_block, buf.shape[1], buf.shape[0]],
        block=[_ZERO_THREADS, 1, 1], stream=stream)


def _fa4_kernels(v: BackwardVariant):
    """(preprocess, main, postprocess dQ, postprocess dK, postprocess dV) objects,
    configured as FA4's interface configures them for SM90."""
    t, dt = v.tile, _DTYPES[v.dtype]
    mult = t.hdim_multiple_of
    score_mod = score_mod_bwd = None
    if v.softcap is not None:
        score_mod = fa_utils.create_softcap_scoremod(v.softcap)
        score_mod_bwd = fa_utils.create_softcap_scoremod_bwd(v.softcap)
    pre = FlashAttentionBackwardPreprocess(dt, v.head_dim, v.head_dim_v, t.m_block_size,
                                           hdim_multiple_of=mult)
    main = FlashAttentionBackwardSm90(
        dt, v.head_dim, v.head_dim_v, v.qhead_per_kvhead, v.mask == "causal",
        is_local=v.mask == "local", deterministic=v.deterministic, tile_m=t.m_block_size,
        tile_n=t.n_block_size, Q_stage=t.num_stages_Q, dO_stage=t.num_stages_dO,
        PdS_stage=t.num_stages_PdS, SdP_swapAB=t.SdP_swapAB, dKV_swapAB=t.dKV_swapAB,
        dQ_swapAB=t.dQ_swapAB, AtomLayoutMSdP=t.AtomLayoutMSdP, AtomLayoutNdKV=t.AtomLayoutNdKV,
        AtomLayoutMdQ=t.AtomLayoutMdQ, num_threads=(t.num_wg + 1) * 128, V_in_regs=False,
        score_mod=score_mod, score_mod_bwd=score_mod_bwd, dQ_single_wg=t.dQ_single_wg)
    threads_dq = 128 if t.dQ_single_wg else t.num_wg * 128
    post_dq = FlashAttentionBackwardPostprocess(dt, v.head_dim, 90, t.m_block_size, threads_dq,
                                                t.AtomLayoutMdQ, t.dQ_swapAB,
                                                hdim_multiple_of=mult)
    post_dk = post_dv = None
    if v.gqa_accum:
        post_dk, post_dv = (
            FlashAttentionBackwardPostprocess(dt, hd, 90, t.n_block_size, t.num_wg * 128,
                                              t.AtomLayoutNdKV, t.dKV_swapAB,
                                              hdim_multiple_of=mult)
            for hd in (v.head_dim, v.head_dim_v))
    return pre, main, post_dq, post_dk, post_dv


def _tensors(v: BackwardVariant, args):
    """Plain Python (not staged): the launcher's flat arguments -> name -> tensor."""
    ops, res = operands(v), results(v)
    ptrs = dict(zip([n for n, _ in ops] + [n for n, _ in res], args[: len(ops) + len(res)]))
    sizes = list(args[len(ops) + len(res):])
    dims, at = {}, 0
    for name, rank in ops + [(n, r) for n, r in res if n in workspace_names(v)]:
        dims[name], at = list(sizes[at: at + rank]), at + rank
    for name in ("q", "k", "v", "o", "do"):  # head dims are compile-time constants
        dims[name][-1] = v.head_dim_v if name in ("v", "o", "do") else v.head_dim
    dims.update(dq=dims["q"], dk=dims["k"], dv=dims["v"])
    if v.has_sinks:
        dims["dsinks"] = dims["sinks"]
    # q/k/v-like rows and the workspaces (padded to tiles) are 16-byte aligned.
    plain = ("lse", "dlse", "cu_seqlens_q", "cu_seqlens_k", "seqused_q", "seqused_k", "sinks",
             "dsinks", "dq_semaphore", "dk_semaphore", "dv_semaphore")
    t = {n: _row_major(p, dims[n], aligned=n not in plain) for n, p in ptrs.items()}
    if v.gqa_accum:  # (rows, heads, n) views for the zero kernel; packed has one row
        for n in ("dk_accum", "dv_accum"):
            t[n + "_3d"] = (t[n] if v.layout == "dense"
                            else _row_major(ptrs[n], [1] + dims[n], aligned=True))
    for n in v.semaphores:  # 4-D as FA4 indexes them; flat (1, 1, size) to zero them
        b, h, blocks, c = dims[n]
        t[n + "_3d"] = _row_major(ptrs[n], [1, 1, b * h * blocks * c], aligned=False)
    return t


def _zero_workspaces(v: BackwardVariant, t: dict, stream) -> None:
    """Plain Python (not staged): zeroes GQA's dK/dV accumulators (the main kernel adds
    into them) and the deterministic schedule's semaphores (they count the adds done so
    far, must start at 0 on every call, and XLA hands out reused memory)."""
    for n in (["dk_accum", "dv_accum"] if v.gqa_accum else []) + list(v.semaphores):
        _zero(t[n + "_3d"], stream)


def _make_launcher(v: BackwardVariant):
    pre, main, post_dq, post_dk, post_dv = _fa4_kernels(v)
    local = v.mask == "local"

    @cute.jit
    def launch(stream: cuda.CUstream, *args):
        # args: operand pointers, result pointers, sizes, wl, wr, scale.
        wl, wr, scale = args[-3], args[-2], args[-1]
        t = _tensors(v, args[:-3])
        g = t.get
        _zero_workspaces(v, t, stream)
        pre(t["o"], t["do"], t["dpsum"], t["lse"], t["lse_log2"], t["dq_accum"],
            g("cu_seqlens_q"), g("seqused_q"), t["dlse"], None, None, scale, None, None,
            stream=stream)
        main(t["q"], t["k"], t["v"], t["do"], t["lse_log2"], t["dpsum"], t["dq_accum"],
             t["dk_accum"] if cutlass.const_expr(v.gqa_accum) else t["dk"],
             t["dv_accum"] if cutlass.const_expr(v.gqa_accum) else t["dv"],
             scale, g("cu_seqlens_q"), g("cu_seqlens_k"), g("seqused_q"), g("seqused_k"),
             wl if cutlass.const_expr(local and v.window_left) else None,
             wr if cutlass.const_expr(local and v.window_right) else None,
             g("dq_semaphore"), g("dk_semaphore"), g("dv_semaphore"), stream=stream)
        sink = None
        if cutlass.const_expr(v.has_sinks):
            sink = LearnableSinkBwdTensors(t["dpsum"], t["lse"], t["sinks"], t["dsinks"])
        post_dq(t["dq_accum"], t["dq"], scale, g("cu_seqlens_q"), g("seqused_q"), sink,
                stream=stream)
        if cutlass.const_expr(v.gqa_accum):
            post_dk(t["dk_accum"], t["dk"], scale, g("cu_seqlens_k"), g("seqused_k"), None,
                    stream=stream)
            post_dv(t["dv_accum"], t["dv"], Float32(1.0), g("cu_seqlens_k"), g("seqused_k"),
                    None, stream=stream)

    return launch


def compile_backward(v: BackwardVariant) -> bytes:
    """Compiles `v` for sm_90a; returns the ELF object holding launcher and cubins."""
    launch = _make_launcher(v)
    dt = _DTYPES[v.dtype]
    gmem = cute.AddressSpace.gmem
    ptrs = []
    for name, _ in operands(v) + results(v):
        if name in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
            ptrs.append(make_ptr(dt, 16, gmem, assumed_align=16))
        elif name.startswith(("cu_seqlens", "seqused")) or workspace_dtype(name) == "int32":
            ptrs.append(make_ptr(Int32, 4, gmem, assumed_align=4))
        else:  # float32 statistics, sinks and workspaces
            align = 16 if name in workspace_names(v) else 4
            ptrs.append(make_ptr(Float32, align, gmem, assumed_align=align))
    sizes = [Int32(1) for _ in size_dims(v)]
    compiled = cute.compile(launch, cuda.CUstream(0), *ptrs, *sizes, Int32(0), Int32(0),
                            Float32(1.0))
    return compiled.dump_to_object(v.symbol)
