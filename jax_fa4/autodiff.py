"""Gradients for the forward primitive.

Until the native FA4 backward lands, the VJP recomputes attention in pure JAX (the
same function as the non-CUDA fallback: float32 softmax) and differentiates that.
Integer operands (cu_seqlens, seqused, page tables) get float0 cotangents.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .primitive import FwdParams, fa4_forward, fallback_call


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fa4_call(args: dict, params: FwdParams):
    """(out, lse) of the FA4 forward for `args` (forward_abi operand names -> arrays;
    absent operands are left out, not None)."""
    return fa4_forward(args, params)


def _fwd(args, params):
    return fa4_forward(args, params), args


def _bwd(params, args, cts):
    floats = {k: x for k, x in args.items() if jnp.issubdtype(x.dtype, jnp.floating)}
    ints = {k: x for k, x in args.items() if k not in floats}
    _, vjp = jax.vjp(lambda fl: fallback_call({**fl, **ints}, params), floats)
    (grads,) = vjp(tuple(cts))
    zeros = {k: np.zeros(x.shape, jax.dtypes.float0) for k, x in ints.items()}
    return ({**grads, **zeros},)


fa4_call.defvjp(_fwd, _bwd)
