"""Public entry points for inference layouts: packed variable-length batches
(`varlen_attention`) and a paged KV cache (`paged_attention`).

FlashAttention conventions throughout: sequences are packed along the first axis and
delimited by `cu_seqlens` (int32, (B+1,)); `seqused_*` (int32, (B,)) give how many
rows of each sequence are used; causal masks and windows are bottom-right aligned per
sequence (query i of a sequence with Tq queries and Tk keys sees keys up to
Tk - Tq + i, shifted by the window).  Lengths are traced int32 arrays; `max_seqlen_*`
are static Python ints (they size the fallback's padded buffers).

Bad metadata never reads out of bounds: `guard.clamped_operands` clamps page indices,
lengths and offsets on the device before the kernel and the fallback see them
(docs/PAGED.md, "Bad input: what each gets").
"""
from __future__ import annotations

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from . import fallback, guard
from .api import _as_array, _scalar, _sinks, _window, backward_reason
from .autodiff import fa4_call
from .dispatch import Unsupported, VarlenCall, plan_varlen, platform_reason
from .kernels.split import check_num_splits
from .primitive import FwdParams

_IMPLEMENTATIONS = (None, "fa4", "xla")


def _int_array(x, name, shape, *, optional=False):
    if x is None:
        if optional:
            return None
        raise ValueError(f"{name} is required")
    x = _as_array(x, name)
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def _static_len(x, name):
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x <= 0:
        raise ValueError(f"{name} must be a positive Python int (static), got {x!r}")
    return int(x)


def _common(q, k, v, scale, logits_soft_cap, sinks, implementation, is_causal,
            local_window_size, q_name="q"):
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{q_name}, keys and values must share a dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{q_name} must be floating point, got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{q_name} head_dim {q.shape[-1]} must equal the keys' head_dim "
                         f"{k.shape[-1]}")
    n, kh = q.shape[-2], k.shape[-2]
    if kh == 0 or n % kh:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
    scale = _scalar(scale, "scale")
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else scale
    softcap = _scalar(logits_soft_cap, "logits_soft_cap", positive=True)
    # Same parsing as attention's; here (left, right) are FA's bottom-right bounds.
    return scale, softcap, _sinks(sinks, n), _window(is_causal, local_window_size)


def _run(kind, call: VarlenCall, args: dict, scale, window, softcap, max_seqlen_q,
         max_seqlen_k, implementation):
    """(out, lse as the kernel lays it out) by the kernel or the fallback, both from
    the same operands with their metadata clamped in bounds (guard.py)."""
    args = guard.clamped_operands(kind, args)
    try:
        plan = plan_varlen(call)
    except Unsupported as e:
        if implementation == "fa4":
            raise NotImplementedError(f"jax_fa4: implementation='fa4' cannot run this call: {e}")
        plan = None
    if plan is not None and implementation != "xla":
        params = FwdParams(kind, plan, scale, window, softcap, forced=implementation == "fa4",
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        o, lse = fa4_call(args, params)
        if "cu_seqlens_q" in args:  # the kernel leaves rows outside every sequence unwritten
            cu_q = args["cu_seqlens_q"]
            len_q = args.get("seqused_q", cu_q[1:] - cu_q[:-1])
            _, _, used = fallback.packed_rows(cu_q, len_q, o.shape[0])
            o = jnp.where(used[:, None, None], o, 0).astype(o.dtype)
            lse = jnp.where(used[None, :], lse, -jnp.inf)
        return o, lse
    return fallback.run(kind, args, scale=scale, window=window, softcap=softcap,
                        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q, max_seqlen_k,
                     seqused_q=None, seqused_k=None, scale=None, is_causal=False,
                     local_window_size=None, logits_soft_cap=None, sinks=None,
                     implementation=None, return_residual=False, num_splits=None):
    """Attention over a packed batch of sequences of different lengths.

    q (total_q, N, H), k (total_k, K, H), v (total_k, K, Hv); sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (of which the first seqused_q[b] are used,
    if given), likewise for keys.  max_seqlen_q/k must bound every sequence's length:
    the kernel computes every row regardless, but the pure-JAX path pads to them and
    truncates a longer sequence (its query rows from max_seqlen_q on come back zero
    with lse -inf; keys from max_seqlen_k on are not seen).  Bad offsets never read
    out of bounds: cu_seqlens are made non-decreasing and clipped to the rows, seqused
    to its sequence's rows (docs/PAGED.md, "Bad input: what each gets").
    Returns out (total_q, N, Hv) (rows outside every used range are zero) and, with
    return_residual, lse float32 (total_q, N).  implementation: None, 'fa4' or 'xla'
    (jax_fa4's pure-JAX path).  num_splits: split-KV slices (see paged_attention); packed
    queries run unsplit, so only None or 1 are accepted here.
    """
    setup = _varlen_setup(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          seqused_q, seqused_k, scale, is_causal, local_window_size,
                          logits_soft_cap, sinks, implementation, num_splits)
    o, lse = _run("varlen", *setup, implementation)
    return (o, lse.T) if return_residual else o


def _varlen_setup(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
                  seqused_k, scale, is_causal, local_window_size, logits_soft_cap, sinks,
                  implementation, num_splits=None):
    """Validates a varlen call -> (VarlenCall, operands, scale, window, softcap, max_q, max_k)."""
    q, k, v = (_as_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k and v must be packed (total, heads, head_dim); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree in rows and heads")
    scale, softcap, sinks, window = _common(q, k, v, scale, logits_soft_cap, sinks,
                                            implementation, is_causal, local_window_size)
    cu_q = _as_array(cu_seqlens_q, "cu_seqlens_q")
    if cu_q.ndim != 1 or cu_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must have shape (B+1,) with B >= 1, got {cu_q.shape}")
    b = cu_q.shape[0] - 1
    cu_q = _int_array(cu_q, "cu_seqlens_q", (b + 1,))
    cu_k = _int_array(cu_seqlens_k, "cu_seqlens_k", (b + 1,))
    seqused_q = _int_array(seqused_q, "seqused_q", (b,), optional=True)
    seqused_k = _int_array(seqused_k, "seqused_k", (b,), optional=True)
    max_q = _static_len(max_seqlen_q, "max_seqlen_q")
    max_k = _static_len(max_seqlen_k, "max_seqlen_k")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_q=seqused_q,
                seqused_k=seqused_k, sinks=sinks)
    args = {n: x for n, x in args.items() if x is not None}
    call = VarlenCall(
        dtype=np.dtype(q.dtype).name, q_layout="packed", kv_layout="packed", batch=b,
        total_q=q.shape[0], heads_q=q.shape[1], heads_k=k.shape[1], head_dim=q.shape[2],
        head_dim_v=v.shape[2], kv_rows=k.shape[0], window=window, softcap=softcap,
        has_sinks=sinks is not None, has_seqused_q=seqused_q is not None,
        has_seqused_k=seqused_k is not None, num_splits=check_num_splits(num_splits, b))
    return call, args, scale, window, softcap, max_q, max_k


def paged_attention(q, k_cache, v_cache, page_table, seqused_k, *, cu_seqlens_q=None,
                    max_seqlen_q=None, scale=None, is_causal=False, local_window_size=None,
                    logits_soft_cap=None, sinks=None, implementation=None,
                    return_residual=False, check_page_indices=False, num_splits=None):
    """Attention of queries against a paged KV cache.

    k_cache (num_pages, page_size, K, H), v_cache (num_pages, page_size, K, Hv);
    page_table int32 (B, max_pages): sequence b's token t lives in page
    page_table[b, t // page_size], slot t % page_size; seqused_k int32 (B,) tokens per
    sequence.  q dense (B, Tq, N, H) (decode Tq = 1, speculative Tq > 1, chunked
    prefill), or packed (total_q, N, H) with cu_seqlens_q (B+1,) and max_seqlen_q.
    Causal is bottom-right aligned: query i of Tq sees keys up to seqused_k - Tq + i.

    Page indices of the used pages should lie in [0, num_pages) and seqused_k in
    [0, max_pages * page_size].  Nothing reads out of bounds when they do not: inside
    the call, on the device, page indices are clipped to [0, num_pages) and seqused_k
    to [0, max_pages * page_size] (packed q: cu_seqlens_q made non-decreasing and
    clipped to the rows), and both the kernel and the pure-JAX path attend over the
    clipped values (docs/PAGED.md, "Bad input: what each gets").
    check_page_indices=True rejects such arguments instead: with a concrete page_table
    and seqused_k (numpy arrays or jax Arrays, outside jit) the call checks them on
    the host and raises ValueError naming the row; with traced ones (under jit) an
    io_callback checks them when the program runs, before the kernel, and the
    ValueError surfaces as a jax runtime error (jax.errors.JaxRuntimeError) whose
    message contains the ValueError's text.
    Returns out like q with Hv, and with return_residual lse float32 (B, Tq, N) or
    (total_q, N).

    Decode (dense q whose query rows per KV head fit one kernel tile) runs split-KV:
    each sequence's keys are cut into num_splits slices processed by separate thread
    blocks, then merged.  num_splits=None picks the count from batch, KV heads and the
    page table's capacity (kernels/split.py); 1 turns splitting off; an int > 1 forces
    it (dense q only).
    """
    if not isinstance(check_page_indices, bool):
        raise ValueError(f"check_page_indices must be a bool, got {check_page_indices!r}")
    call, args, *rest = _paged_setup(q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q,
                                     max_seqlen_q, scale, is_causal, local_window_size,
                                     logits_soft_cap, sinks, implementation, num_splits)
    if check_page_indices:
        pt, used = args["page_table"], args["seqused_k"]
        geometry = dict(num_pages=args["k"].shape[0], page_size=args["k"].shape[1])
        if isinstance(pt, jax.core.Tracer) or isinstance(used, jax.core.Tracer):
            args["page_table"] = _checked_page_table(pt, used, **geometry)
        else:  # concrete: check now, raise ValueError here
            _check_pages(np.asarray(pt), np.asarray(used), **geometry)
    o, lse = _run("paged", call, args, *rest, implementation)
    if not return_residual:
        return o
    return o, (lse.T if call.q_layout == "packed" else jnp.swapaxes(lse, 1, 2))


def _paged_setup(q, k_cache, v_cache, page_table, seqused_k, cu_seqlens_q, max_seqlen_q, scale,
                 is_causal, local_window_size, logits_soft_cap, sinks, implementation,
                 num_splits=None):
    """Validates a paged call -> (VarlenCall, operands, scale, window, softcap, max_q, None)."""
    q, kc, vc = (_as_array(x, n) for x, n in ((q, "q"), (k_cache, "k_cache"),
                                              (v_cache, "v_cache")))
    if kc.ndim != 4 or vc.ndim != 4:
        raise ValueError("k_cache and v_cache must be (num_pages, page_size, kv_heads, "
                         f"head_dim); got {kc.shape} and {vc.shape}")
    if kc.shape[:3] != vc.shape[:3]:
        raise ValueError(f"k_cache {kc.shape} and v_cache {vc.shape} must have the same "
                         "number of pages, page size and kv heads")
    scale, softcap, sinks, window = _common(q, kc, vc, scale, logits_soft_cap, sinks,
                                            implementation, is_causal, local_window_size)
    pt = _as_array(page_table, "page_table")
    if pt.ndim != 2 or pt.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 of shape (batch, max_pages), got "
                         f"{pt.dtype}{list(pt.shape)}")
    b = pt.shape[0]
    seqused_k = _int_array(seqused_k, "seqused_k", (b,))
    if cu_seqlens_q is None:
        if q.ndim != 4 or q.shape[0] != b:
            raise ValueError(f"q must be (batch={b}, Tq, heads, head_dim) without cu_seqlens_q, "
                             f"got {q.shape}")
        if max_seqlen_q is not None and max_seqlen_q != q.shape[1]:
            raise ValueError("max_seqlen_q only applies to packed q (with cu_seqlens_q)")
        max_q = q.shape[1]
        cu_q = None
    else:
        if q.ndim != 3:
            raise ValueError(f"with cu_seqlens_q, q must be packed (total_q, heads, head_dim), "
                             f"got {q.shape}")
        cu_q = _int_array(cu_seqlens_q, "cu_seqlens_q", (b + 1,))
        max_q = _static_len(max_seqlen_q, "max_seqlen_q")
    args = dict(q=q, k=kc, v=vc, cu_seqlens_q=cu_q, seqused_k=seqused_k, page_table=pt,
                sinks=sinks)
    args = {n: x for n, x in args.items() if x is not None}
    call = VarlenCall(
        dtype=np.dtype(q.dtype).name, q_layout="dense" if cu_q is None else "packed",
        kv_layout="paged", batch=b, total_q=int(np.prod(q.shape[:-2])), heads_q=q.shape[-2],
        heads_k=kc.shape[2], head_dim=q.shape[-1], head_dim_v=vc.shape[3],
        kv_rows=kc.shape[0] * kc.shape[1], window=window, softcap=softcap,
        has_sinks=sinks is not None, has_seqused_k=True, page_size=kc.shape[1],
        max_pages=pt.shape[1], num_splits=check_num_splits(num_splits, b))
    return call, args, scale, window, softcap, max_q, None


def kernel_plan(fn: str, **kwargs):
    """The kernel plan `varlen_attention` / `paged_attention` (fn) would use with these
    arguments (arrays or ShapeDtypeStructs) on an SM90 GPU; raises dispatch.Unsupported
    if it would fall back.  Needs no GPU and no compiler (used by precompile)."""
    kw = dict(scale=None, is_causal=False, local_window_size=None, logits_soft_cap=None,
              sinks=None, implementation=None)
    if fn == "varlen_attention":
        kw.update(seqused_q=None, seqused_k=None)
        kw.update(kwargs)
        return plan_varlen(_varlen_setup(**kw)[0])
    if fn == "paged_attention":
        kw.update(cu_seqlens_q=None, max_seqlen_q=None)
        kw.update(kwargs)
        return plan_varlen(_paged_setup(**kw)[0])
    raise ValueError(f"fn must be 'varlen_attention' or 'paged_attention', got {fn!r}")


def explain_call(fn: str, *, platform=None, backward=False, **kwargs):
    """Why `varlen_attention` / `paged_attention` (fn) with these arguments (arrays or
    ShapeDtypeStructs) would not run the FA4 kernel, or None if it would.  platform:
    where it would run; default: JAX's default backend.  backward=True: why its
    gradient would not run FA4's backward kernel (see `jax_fa4.explain`)."""
    try:
        plan = kernel_plan(fn, **kwargs)
        if backward:
            backward_reason(plan)
    except Unsupported as e:
        return str(e)
    return platform_reason(platform)


def _check_pages(pt: np.ndarray, used: np.ndarray, *, num_pages: int, page_size: int):
    """Host check of a page table and lengths: ValueError naming the first bad row."""
    max_pages = pt.shape[1]
    if (used < 0).any() or (used > max_pages * page_size).any():
        raise ValueError(f"seqused_k {used.tolist()} is negative or exceeds the page table's "
                         f"capacity ({max_pages} pages of {page_size})")
    n_used = -(-used // page_size)
    for b in range(pt.shape[0]):
        pages = pt[b, : n_used[b]]
        if ((pages < 0) | (pages >= num_pages)).any():
            raise ValueError(f"page_table[{b}] uses pages {pages.tolist()} outside "
                             f"[0, {num_pages})")


def _checked_page_table(page_table, seqused_k, *, num_pages, page_size):
    """The (traced) page table, after a host-side check of every page the sequences use
    when the program runs; a bad index raises there, before the kernel reads anything
    (as a jax runtime error carrying the ValueError's message)."""
    def check(pt, used):
        pt = np.asarray(pt)
        _check_pages(pt, np.asarray(used), num_pages=num_pages, page_size=page_size)
        return pt

    return jax.experimental.io_callback(
        check, jax.ShapeDtypeStruct(page_table.shape, page_table.dtype), page_table, seqused_k,
        ordered=False)
