"""jax_fa4: FlashAttention-4's Hopper (SM90) kernels inside jax.jit.

Layers: api (attention; validation) -> dispatch (capability, reasons) ->
primitive (lowering per platform, batching) -> kernels (variants, CuTe DSL
launchers, compile, cache) -> csrc (the XLA FFI handler).
"""
from . import export
from .api import attention, explain, is_supported
from .flax_adapter import flax_attention, make_flax_attention
from .kernels import MissingKernelError
from .paged_cache import update_paged_cache
from .paged import paged_attention
from .varlen import explain_call, varlen_attention

__version__ = "0.1.0"
__all__ = [
    "attention",
    "export",
    "explain",
    "explain_call",
    "flax_attention",
    "is_supported",
    "make_flax_attention",
    "paged_attention",
    "update_paged_cache",
    "varlen_attention",
    "MissingKernelError",
    "__version__",
]
