"""The float64 NumPy attention reference of the GPU tests (one sequence at a time;
FA's bottom-right alignment is an offset): written out independently of jax_fa4."""
import numpy as np


def visible(tq, tk, offset, window):
    """(tq, tk) bool: query i (at key position i + offset) sees key j."""
    i, j = np.arange(tq)[:, None] + offset, np.arange(tk)[None, :]
    vis = np.ones((tq, tk), bool)
    if window[0] is not None:
        vis &= j >= i - window[0]
    if window[1] is not None:
        vis &= j <= i + window[1]
    return vis


def sequence64(q, k, v, *, offset, window, scale, softcap, sinks):
    """float64: q (Tq, N, H), k (Tk, K, H), v (Tk, K, Hv); query i sits at key position
    i + offset; window (left, right), None unbounded.  -> out (Tq, N, Hv), lse (Tq, N)."""
    tq, n, _ = q.shape
    tk, kh, hv = v.shape
    if tq == 0:
        return np.zeros((0, n, hv)), np.zeros((0, n))
    g = n // kh
    kr = np.repeat(k, g, axis=1).transpose(1, 2, 0)  # (N, H, Tk)
    vr = np.repeat(v, g, axis=1).transpose(1, 0, 2)  # (N, Tk, Hv)
    s = np.matmul(q.transpose(1, 0, 2), kr) * scale  # (N, Tq, Tk)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    vis = visible(tq, tk, offset, window)
    s = np.where(vis[None], s, -np.inf)
    m = s.max(-1, initial=-np.inf)
    if sinks is not None:
        m = np.maximum(m, sinks[:, None])
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m[..., None])
    lsum = p.sum(-1) + (0.0 if sinks is None else np.exp(sinks[:, None] - m))
    lse = np.where(lsum > 0, np.log(np.where(lsum > 0, lsum, 1.0)) + m, -np.inf)
    o = np.matmul(p, vr) / np.where(lsum > 0, lsum, 1.0)[..., None]
    return o.transpose(1, 0, 2), lse.T
