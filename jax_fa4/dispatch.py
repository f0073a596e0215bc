"""Which path a call takes: the FA4 SM90 kernel, or the fallback, and why.

`plan_dense` is a pure function of static call properties (shapes, dtypes,
options): it either names the kernel variant and its runtime window arguments or
gives the reason the kernel cannot run.  The device check (an SM90 GPU) happens
at lowering time, per platform, in `device_reason`.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from .kernels.config import ForwardVariant

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class DenseCall:
    """Static description of one `attention` call (4-D BTNH layout)."""

    dtype: str
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_k: int
    head_dim: int
    head_dim_v: int
    window: tuple[int | None, int | None]  # top-left aligned (jax.nn); None = unbounded
    softcap: float | None = None
    has_sinks: bool = False
    has_bias: bool = False
    has_mask: bool = False


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    variant: ForwardVariant
    window_left: int  # runtime window bounds in FA4's bottom-right convention
    window_right: int


class Unsupported(Exception):
    """The kernel cannot run this call; str(self) says why."""


def _check_head_dim(name: str, d: int) -> None:
    if d % 8 or not 8 <= d <= 256:
        raise Unsupported(f"{name} {d} is not supported by the SM90 kernel "
                          "(a multiple of 8 between 8 and 256)")


def plan_dense(c: DenseCall) -> KernelPlan:
    """The kernel variant for `c`, or raises Unsupported with the reason."""
    if c.has_bias:
        raise Unsupported("bias is not supported by the FA4 kernel")
    if c.has_mask:
        raise Unsupported("an explicit mask is not supported by the FA4 kernel "
                          "(use is_causal / local_window_size)")
    if c.dtype not in ("bfloat16", "float16"):
        raise Unsupported(f"dtype {c.dtype} is not supported by the FA4 kernel "
                          "(bfloat16 or float16)")
    _check_head_dim("head_dim", c.head_dim)
    _check_head_dim("value head_dim", c.head_dim_v)
    if min(c.batch, c.seq_q, c.seq_k, c.heads_q, c.heads_k) == 0:
        raise Unsupported("an empty dimension (batch, sequence or heads is 0)")
    for name, n in [
        ("query", c.batch * c.seq_q * c.heads_q * max(c.head_dim, c.head_dim_v)),
        ("key/value", c.batch * c.seq_k * c.heads_k * max(c.head_dim, c.head_dim_v)),
    ]:
        if n > _INT32_MAX:
            raise Unsupported(f"{name} has more than 2**31-1 elements (int32 indexing)")
    if c.heads_q % c.heads_k:
        raise Unsupported("query heads are not a multiple of key/value heads")

    # jax.nn aligns query i with key i (top-left); FA4 aligns the last query with the
    # last key (bottom-right), i.e. query i with key i + offset.
    offset = c.seq_k - c.seq_q
    left, right = c.window
    fa_left = None if left is None else left + offset
    fa_right = None if right is None else right - offset
    for name, w in (("left", fa_left), ("right", fa_right)):
        if w is not None and w < 0:
            raise Unsupported(
                f"with seq_q={c.seq_q} and seq_k={c.seq_k} the {name} window bound is "
                f"{w} in FA4's bottom-right-aligned convention; the kernel needs >= 0"
            )
    if fa_left is None and fa_right is None:
        mask, wl, wr = "none", 0, 0
    elif fa_left is None and fa_right == 0:
        mask, wl, wr = "causal", 0, 0
    else:
        mask, wl, wr = "local", fa_left or 0, fa_right or 0
        # Window bounds beyond the sequence change nothing but could overflow int32.
        wl, wr = min(wl, c.seq_k + c.seq_q), min(wr, c.seq_k + c.seq_q)
    variant = ForwardVariant(
        dtype=c.dtype,
        head_dim=c.head_dim,
        head_dim_v=c.head_dim_v,
        qhead_per_kvhead=c.heads_q // c.heads_k,
        mask=mask,
        window_left=mask == "local" and fa_left is not None,
        window_right=mask == "local" and fa_right is not None,
        softcap=c.softcap,
        has_sinks=c.has_sinks,
    )
    return KernelPlan(variant, wl, wr)


def device_reason() -> str | None:
    """Why the local CUDA devices cannot run the kernel, or None if they can.

    Without a local CUDA backend (lowering for CUDA from a CPU host, e.g. to export
    or precompile) we trust the caller that the target is SM90.
    """
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    for d in devices:
        cc = getattr(d, "compute_capability", None)
        if cc is not None and not str(cc).startswith("9"):
            return f"device {d} has compute capability {cc}; the FA4 kernels need 9.x (Hopper)"
    return None


def dtype_name(x) -> str:
    return np.dtype(x.dtype).name
