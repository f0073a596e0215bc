"""Every ValueError for bad input, in one room: dense attention, varlen, paged, the
cache writer and split counts.

Each function takes what the caller passed and returns it normalized (arrays, floats,
(left, right) windows with None unbounded, int32 metadata of checked shapes), or raises
`ValueError` naming the argument, at trace time.  Nothing here decides which path a call
takes (dispatch.py) or clamps traced values (guard.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .kernels.split import MAX_GRID_Z, MAX_SPLITS

DENSE_IMPLEMENTATIONS = (None, "fa4", "cudnn", "xla")
VARLEN_IMPLEMENTATIONS = (None, "fa4", "xla")


def as_array(x, name):
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    return x if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else jnp.asarray(x)


def implementation(impl, allowed):
    if impl not in allowed:
        raise ValueError(f"implementation must be one of {allowed}, got {impl!r}")
    return impl


def flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def window(is_causal, local_window_size, *, literal=False):
    """Normalizes is_causal and local_window_size to (left, right), None = unbounded
    (the alignment, top-left or bottom-right, is the caller's convention).  FA's
    convention (varlen, paged): -1 means unbounded.  literal=True (`attention`, as
    jax.nn): every int is a bound, negative ones too."""
    if local_window_size is None:
        left = right = None
    else:
        if isinstance(local_window_size, (int, np.integer)):
            pair = (local_window_size, local_window_size)
        else:
            try:
                pair = tuple(local_window_size)
            except TypeError:
                pair = ()
            if len(pair) != 2:
                raise ValueError("local_window_size must be an int or a (left, right) pair, "
                                 f"got {local_window_size!r}")
        for w in pair:
            if w is None and literal:  # jax_fa4's extension: that side is unbounded
                continue
            if not isinstance(w, (int, np.integer)) or isinstance(w, bool):
                raise ValueError(f"local_window_size entries must be ints, got {local_window_size!r}")
            if w < -1 and not literal:
                raise ValueError(f"local_window_size entries must be >= -1 (-1 means unbounded), "
                                 f"got {local_window_size!r}")
        left, right = (None if w is None or (w == -1 and not literal) else int(w)
                       for w in pair)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def scalar(x, name, *, positive=False):
    if x is None:
        return None
    try:
        val = float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{name} must be a static Python number, got {x!r}") from e
    if not math.isfinite(val) or (positive and val <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {val}")
    return val


def sinks(x, n):
    """Validated sinks of shape (n,), as float32 (what the kernel reads)."""
    if x is None:
        return None
    x = as_array(x, "sinks")
    if x.shape != (n,) or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"sinks must be a float array of shape (num_query_heads,) = ({n},), "
                         f"got {x.dtype}{list(x.shape)}")
    return x if isinstance(x, jax.ShapeDtypeStruct) else x.astype(jnp.float32)


def traced(x) -> bool:
    """Whether x is a tracer: a value known only when the program runs."""
    return isinstance(x, jax.core.Tracer)


def head_counts(n: int, kh: int, head_dim: int, head_dim_v: int, q_name: str) -> None:
    """Heads and head dims every function needs: at least one of each (the default
    scale is 1/sqrt(head_dim)), and GQA's whole groups."""
    if kh < 1:
        raise ValueError(f"key/value must have at least one head, got {kh}")
    if n % kh:
        raise ValueError(f"{q_name} heads ({n}) must be a multiple of key/value heads ({kh})")
    if head_dim < 1 or head_dim_v < 1:
        raise ValueError(f"head dims must be >= 1, got {q_name}/key {head_dim} and value "
                         f"{head_dim_v}")


def attention_args(query, key, value, scale, is_causal, local_window_size, logits_soft_cap,
                   sinks_, impl):
    """`attention`'s arguments -> (q, k, v, sinks, scale, softcap, window top-left).
    scale may be traced (as jax.nn allows): it is returned as the tracer."""
    implementation(impl, DENSE_IMPLEMENTATIONS)
    flag(is_causal, "is_causal")
    q, k, v = (as_array(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError("query, key and value must all be 4-D (B, T, N, H) or all 3-D (T, N, H); "
                         f"got query {q.shape}, key {k.shape}, value {v.shape}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"key {k.shape} and value {v.shape} must agree in all but the last axis")
    if q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"query {q.shape} and key {k.shape} must have the same batch size")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query head_dim {q.shape[-1]} must equal key head_dim {k.shape[-1]}")
    head_counts(q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], "query")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"query/key/value must be floating point, got {q.dtype}")
    if traced(scale):
        if scale.shape != ():
            raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    else:
        scale = scalar(scale, "scale")
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
    softcap = scalar(logits_soft_cap, "logits_soft_cap", positive=True)
    return (q, k, v, sinks(sinks_, q.shape[-2]), scale, softcap,
            window(is_causal, local_window_size, literal=True))


def seq_lengths(x, name, batch: int):
    """query_seq_lengths / key_value_seq_lengths: int32 (B,) as jax.nn requires."""
    if x is None:
        return None
    x = as_array(x, name)
    if x.ndim != 1 or x.dtype != jnp.int32 or x.shape[0] != batch:
        raise ValueError(f"{name} must be int32 of shape (batch,) = ({batch},), got "
                         f"{x.dtype}{list(x.shape)}")
    return x


def residual_flags(return_residual, return_lse):
    """attention's two residual options: jax.nn's (rounded, no gradient) or jax_fa4's
    float32 differentiable lse; at most one."""
    flag(return_residual, "return_residual")
    flag(return_lse, "return_lse")
    if return_residual and return_lse:
        raise ValueError("pass return_residual (jax.nn's residual: input dtype, no gradient) "
                         "or return_lse (float32, differentiable), not both")


def mask(m):
    """A boolean mask (True = visible), as jax.nn requires; an int or float mask (e.g. an
    additive 0/-inf one) would otherwise be read as 'nonzero = visible'."""
    if m is None:
        return None
    m = as_array(m, "mask")
    if m.dtype != np.dtype(bool):
        raise ValueError(f"mask dtype should be bool, but got {m.dtype} (jax.nn's rule; "
                         "pass an additive mask as bias)")
    return m


def qkv_common(q, k, v, scale, logits_soft_cap, sinks_, impl, is_causal, local_window_size,
               q_name="q"):
    """The options varlen and paged calls share -> (scale, softcap, sinks, window), the
    window in FA's bottom-right convention."""
    implementation(impl, VARLEN_IMPLEMENTATIONS)
    flag(is_causal, "is_causal")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{q_name}, keys and values must share a dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{q_name} must be floating point, got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{q_name} head_dim {q.shape[-1]} must equal the keys' head_dim "
                         f"{k.shape[-1]}")
    n = q.shape[-2]
    head_counts(n, k.shape[-2], q.shape[-1], v.shape[-1], q_name)
    scale = scalar(scale, "scale")
    scale = 1.0 / float(np.sqrt(q.shape[-1])) if scale is None else scale
    softcap = scalar(logits_soft_cap, "logits_soft_cap", positive=True)
    return scale, softcap, sinks(sinks_, n), window(is_causal, local_window_size)


def int_array(x, name, shape, *, optional=False):
    if x is None:
        if optional:
            return None
        raise ValueError(f"{name} is required")
    x = as_array(x, name)
    if x.dtype != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def static_len(x, name):
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x <= 0:
        raise ValueError(f"{name} must be a positive Python int (static), got {x!r}")
    return int(x)


def cu_seqlens(x, name):
    """(B+1,) int32 offsets with B >= 1 -> (array, B)."""
    x = as_array(x, name)
    if x.ndim != 1 or x.shape[0] < 2:
        raise ValueError(f"{name} must have shape (B+1,) with B >= 1, got {x.shape}")
    return int_array(x, name, x.shape), x.shape[0] - 1


def num_splits(n, batch: int, *, splittable: bool = True):
    """The split-KV override: None (heuristic) or an int in [1, MAX_SPLITS];
    splittable=False (packed queries) accepts only None or 1."""
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_splits must be None or a positive int, got {n!r}")
    if n > MAX_SPLITS:
        raise ValueError(f"num_splits must be <= {MAX_SPLITS}, got {n}")
    if n * batch > MAX_GRID_Z:
        raise ValueError(f"num_splits * batch must be <= {MAX_GRID_Z} (CUDA grid), got "
                         f"{n} * {batch}")
    if not splittable and n != 1:
        raise ValueError(f"num_splits={n}: split-KV needs dense queries (B, Tq, N, H) and a "
                         "paged KV cache (paged_attention without cu_seqlens_q)")
    return n


def split_grid(splits: int, batch: int) -> None:
    """At lowering: S splits x B sequences must fit the CUDA grid's z extent."""
    if splits * batch > MAX_GRID_Z:
        raise ValueError(f"jax_fa4: {splits} splits x {batch} sequences exceed the CUDA grid's "
                         f"{MAX_GRID_Z} (num_splits * batch); pass a smaller num_splits")


def page_table(pt):
    pt = as_array(pt, "page_table")
    if pt.ndim != 2 or pt.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 of shape (batch, max_pages), got "
                         f"{pt.dtype}{list(pt.shape)}")
    return pt


def paged_cache(k_cache, v_cache):
    kc, vc = as_array(k_cache, "k_cache"), as_array(v_cache, "v_cache")
    if kc.ndim != 4 or vc.ndim != 4:
        raise ValueError("k_cache and v_cache must be (num_pages, page_size, kv_heads, "
                         f"head_dim); got {kc.shape} and {vc.shape}")
    if kc.shape[:3] != vc.shape[:3]:
        raise ValueError(f"k_cache {kc.shape} and v_cache {vc.shape} must have the same "
                         "number of pages, page size and kv heads")
    return kc, vc


def page_indices(pt: np.ndarray, used: np.ndarray, *, num_pages: int, page_size: int):
    """check_page_indices' host check of a concrete page table and lengths: ValueError
    naming the first bad row."""
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


def cache_update_args(k_cache, v_cache, k_new, v_new, pt, positions):
    """update_paged_cache's arguments -> (kc, vc, kn, vn, page_table, positions)."""
    kc, vc, kn, vn = (as_array(x, n) for x, n in ((k_cache, "k_cache"), (v_cache, "v_cache"),
                                                  (k_new, "k_new"), (v_new, "v_new")))
    pt, pos = as_array(pt, "page_table"), as_array(positions, "positions")
    if kc.ndim != 4 or vc.shape[:3] != kc.shape[:3]:
        raise ValueError(f"k_cache {kc.shape} / v_cache {vc.shape} must be (pages, page_size, "
                         "kv_heads, head_dim) with equal pages, page size and heads")
    if pt.ndim != 2 or pt.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 (batch, max_pages), got {pt.dtype}{list(pt.shape)}")
    b = pt.shape[0]
    if pos.dtype != jnp.int32 or pos.ndim != 2 or pos.shape[0] != b:
        raise ValueError(f"positions must be int32 (batch={b}, T), got {pos.dtype}{list(pos.shape)}")
    t = pos.shape[1]
    if kn.shape != (b, t) + kc.shape[2:] or vn.shape != (b, t) + vc.shape[2:]:
        raise ValueError(f"k_new/v_new must be (batch, T, kv_heads, head_dim) = "
                         f"{(b, t) + kc.shape[2:]} / {(b, t) + vc.shape[2:]}, got {kn.shape} / "
                         f"{vn.shape}")
    if kn.dtype != kc.dtype or vn.dtype != vc.dtype:
        raise ValueError("k_new/v_new must have the caches' dtype")
    return kc, vc, kn, vn, pt, pos


def varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q,
                seqused_k, scale, is_causal, local_window_size, logits_soft_cap, sinks_, impl,
                splits):
    """`varlen_attention`'s arguments -> dict(q, k, v, cu_q, cu_k, seqused_q, seqused_k,
    batch, max_q, max_k, scale, softcap, sinks, window (bottom-right), num_splits)."""
    q, k, v = (as_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError("q, k and v must be packed (total, heads, head_dim); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree in rows and heads")
    scale, softcap, sinks_, win = qkv_common(q, k, v, scale, logits_soft_cap, sinks_, impl,
                                             is_causal, local_window_size)
    cu_q, b = cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
    return dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=int_array(cu_seqlens_k, "cu_seqlens_k", (b + 1,)),
                seqused_q=int_array(seqused_q, "seqused_q", (b,), optional=True),
                seqused_k=int_array(seqused_k, "seqused_k", (b,), optional=True), batch=b,
                max_q=static_len(max_seqlen_q, "max_seqlen_q"),
                max_k=static_len(max_seqlen_k, "max_seqlen_k"), scale=scale, softcap=softcap,
                sinks=sinks_, window=win, num_splits=num_splits(splits, b, splittable=False))


def paged_args(q, k_cache, v_cache, pt, seqused_k, cu_seqlens_q, max_seqlen_q, scale,
               is_causal, local_window_size, logits_soft_cap, sinks_, impl, splits):
    """`paged_attention`'s arguments -> dict(q, k, v, page_table, seqused_k, cu_q, batch,
    max_q, scale, softcap, sinks, window (bottom-right), num_splits)."""
    q = as_array(q, "q")
    kc, vc = paged_cache(k_cache, v_cache)
    scale, softcap, sinks_, win = qkv_common(q, kc, vc, scale, logits_soft_cap, sinks_, impl,
                                             is_causal, local_window_size)
    pt = page_table(pt)
    b = pt.shape[0]
    seqused_k = int_array(seqused_k, "seqused_k", (b,))
    if cu_seqlens_q is None:
        if q.ndim != 4 or q.shape[0] != b:
            raise ValueError(f"q must be (batch={b}, Tq, heads, head_dim) without cu_seqlens_q, "
                             f"got {q.shape}")
        if max_seqlen_q is not None and max_seqlen_q != q.shape[1]:
            raise ValueError("max_seqlen_q only applies to packed q (with cu_seqlens_q)")
        max_q, cu_q = q.shape[1], None
    else:
        if q.ndim != 3:
            raise ValueError(f"with cu_seqlens_q, q must be packed (total_q, heads, head_dim), "
                             f"got {q.shape}")
        cu_q = int_array(cu_seqlens_q, "cu_seqlens_q", (b + 1,))
        max_q = static_len(max_seqlen_q, "max_seqlen_q")
    return dict(q=q, k=kc, v=vc, page_table=pt, seqused_k=seqused_k, cu_q=cu_q, batch=b,
                max_q=max_q, scale=scale, softcap=softcap, sinks=sinks_, window=win,
                num_splits=num_splits(splits, b, splittable=cu_q is None))
