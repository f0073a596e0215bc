"""Kernel layer: variants and tiles (config), CuTe DSL launchers (forward),
compilation (compile) and the object cache (cache).  Importing this package
does not import cutlass or flash_attn."""
from .cache import MissingKernelError, cache_dir, get_object
from .config import ForwardVariant, TileConfig, sm90_forward_tile

__all__ = [
    "ForwardVariant",
    "MissingKernelError",
    "TileConfig",
    "cache_dir",
    "get_object",
    "sm90_forward_tile",
]
