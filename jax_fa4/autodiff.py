"""Gradients for the forward primitive.

The forward saves its operands, out and lse; the backward runs FA4's SM90 backward
(backward_primitive.py) when `dispatch.plan_backward` accepts the call, else a
memory-frugal pure-JAX backward (fallback_backward.py) from the same residuals.
The lse cotangent (return_residual) enters as dLSE.  Integer operands (cu_seqlens,
seqused, page tables) get float0 cotangents.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .backward_primitive import gradients
from .forward_primitive import FwdParams, fa4_forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fa4_call(args: dict, params: FwdParams):
    """(out, lse) of the FA4 forward for `args` (forward_abi operand names -> arrays;
    absent operands are left out, not None)."""
    return fa4_forward(args, params)


def _fwd(args, params):
    o, lse = fa4_forward(args, params)
    return (o, lse), (args, o, lse)


def _bwd(params, res, cts):
    args, o, lse = res
    do, dlse = cts
    floats = {k: x for k, x in args.items() if jnp.issubdtype(x.dtype, jnp.floating)}
    grads = gradients(args, o, lse, do.astype(o.dtype), dlse.astype(jnp.float32), params)
    zeros = {k: np.zeros(x.shape, jax.dtypes.float0) for k, x in args.items()
             if k not in floats}
    return ({**{k: grads[k].astype(x.dtype) for k, x in floats.items()}, **zeros},)


fa4_call.defvjp(_fwd, _bwd)
