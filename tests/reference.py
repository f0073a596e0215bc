"""The tests' attention reference, written out independently of jax_fa4: one visibility
rule, one NumPy float64 attention and its jnp twin (differentiable, in the inputs'
dtype: float64 under jax.enable_x64, float32 otherwise).

Windows are (left, right) pairs, None unbounded; `offset` places query i at key
position i + offset (0: jax.nn's top-left alignment; Tk - Tq: FA's bottom-right).  Rows
that see no key give zeros and lse = the sink (or -inf).  `window_of` turns jax.nn-style
arguments (is_causal, local_window_size with -1 unbounded) into a pair.
"""
import jax
import jax.numpy as jnp
import numpy as np


def window_of(causal, window, literal=False):
    """(left, right), None unbounded, from is_causal and local_window_size: -1 is
    unbounded in FA's convention (varlen, paged); literal=True (attention, as jax.nn)
    takes every int as a bound (None entries stay unbounded)."""
    if window is None:
        left = right = None
    else:
        if isinstance(window, (int, np.integer)):
            window = (window, window)
        left, right = (None if w == -1 and not literal else w for w in window)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def visible(tq, tk, offset, window):
    """(tq, tk) bool: query i (at key position i + offset) sees key j."""
    i, j = np.arange(tq)[:, None] + offset, np.arange(tk)[None, :]
    vis = np.ones((tq, tk), bool)
    if window[0] is not None:
        vis &= j >= i - window[0]
    if window[1] is not None:
        vis &= j <= i + window[1]
    return vis


def _attention(xp, q, k, v, sinks, *, scale, window, softcap, offset, bias, mask, precision):
    """The one formula, for xp = numpy or jax.numpy: q (B,T,N,H), k (B,S,K,H),
    v (B,S,K,Hv) -> out (B,T,N,Hv), lse (B,T,N)."""
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    k, v = xp.repeat(k, n // kh, axis=2), xp.repeat(v, n // kh, axis=2)
    ein = (lambda e, x, y: xp.einsum(e, x, y, precision=precision)) if xp is jnp else \
        (lambda e, x, y: xp.einsum(e, x, y, optimize=True))
    logits = ein("btnh,bsnh->bnts", q, k) * scale
    if softcap is not None:
        logits = softcap * xp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + xp.broadcast_to(bias, logits.shape)
    vis = np.broadcast_to(visible(t, s, offset, window), (b, n, t, s))
    if mask is not None:
        vis = vis & xp.broadcast_to(mask, (b, n, t, s))
    logits = xp.where(vis, logits, -xp.inf)
    m = logits.max(axis=-1, initial=-np.inf)  # a row may have no key at all
    if sinks is not None:
        m = xp.maximum(m, sinks[None, :, None])
    m = xp.where(xp.isfinite(m), m, 0.0)
    if xp is jnp:
        m = jax.lax.stop_gradient(m)
    p = xp.exp(logits - m[..., None])
    lsum = p.sum(-1) + (0.0 if sinks is None else xp.exp(sinks[None, :, None] - m))
    ok = lsum > 0
    safe = xp.where(ok, lsum, 1.0)
    out = ein("bnts,bsnh->btnh", p / safe[..., None], v)
    lse = xp.where(ok, xp.log(safe) + m, -xp.inf)
    return out, xp.swapaxes(lse, 1, 2)


def attention64(q, k, v, sinks=None, *, scale, window=(None, None), softcap=None, offset=0,
                bias=None, mask=None):
    """NumPy float64 attention (batched): out (B,T,N,Hv), lse (B,T,N)."""
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    return _attention(np, f(q), f(k), f(v), f(sinks), scale=scale, window=window,
                      softcap=softcap, offset=offset, bias=f(bias),
                      mask=None if mask is None else np.asarray(mask, bool), precision=None)


def attention_jnp(q, k, v, sinks=None, *, scale, window=(None, None), softcap=None, offset=0):
    """The same in jax.numpy, differentiable, in the inputs' dtype."""
    return _attention(jnp, q, k, v, sinks, scale=scale, window=window, softcap=softcap,
                      offset=offset, bias=None, mask=None, precision="highest")


def sequence64(q, k, v, *, offset, window, scale, softcap, sinks):
    """One sequence, float64: q (Tq, N, H), k (Tk, K, H), v (Tk, K, Hv) -> out (Tq, N, Hv),
    lse (Tq, N)."""
    tq, n, _ = q.shape
    if tq == 0:
        return np.zeros((0, n, v.shape[-1])), np.zeros((0, n))
    o, lse = attention64(q[None], k[None], v[None], sinks, scale=scale, window=window,
                         softcap=softcap, offset=offset)
    return o[0], lse[0]
