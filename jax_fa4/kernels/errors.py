"""The kernel layer's error, in a module of its own.

Both the cache (a variant missing where compiling is off) and the compiler (no pinned
toolchain here) raise it; living in neither lets cache.py import compile.py one way
only.  It is re-exported as jax_fa4.MissingKernelError and jax_fa4.kernels.cache's.
"""


class MissingKernelError(RuntimeError):
    """A kernel variant is not cached and may not (or cannot) be compiled here."""
