"""Kernel objects by variant: in-memory cache, on-disk cache, then compilation.

Environment:
  JAX_FA4_CACHE_DIR  on-disk cache (default: $XDG_CACHE_HOME/jax_fa4/kernels,
                     i.e. ~/.cache/jax_fa4/kernels)
  JAX_FA4_COMPILE    "auto" (default: compile what is missing), "never" (only load;
                     a missing variant raises MissingKernelError naming it, with
                     the precompile command that builds it)

Files are written to a temporary name and renamed into place, so concurrent
writers (several processes precompiling) never expose a partial file, and each
file records its key and a SHA-256 of the object, so a corrupt or foreign file
is ignored (and rebuilt) rather than loaded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import struct
import sys
import tempfile
import threading
import time

from . import compile as _compiler
from .errors import MissingKernelError
from .variant import KernelVariant

logger = logging.getLogger("jax_fa4")

_MAGIC = b"JAXFA4K1"
_UMASK = os.umask(0o022)  # read once: mkstemp creates 0600, files get the usual mode
os.umask(_UMASK)
_memory: dict[str, bytes] = {}
_lock = threading.Lock()


def cache_dir() -> pathlib.Path:
    if d := os.environ.get("JAX_FA4_CACHE_DIR"):
        return pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jax_fa4" / "kernels"


def compile_mode() -> str:
    mode = os.environ.get("JAX_FA4_COMPILE", "auto").lower()
    if mode not in ("auto", "never"):
        raise ValueError(f"JAX_FA4_COMPILE must be 'auto' or 'never', got {mode!r}")
    return mode


def _path(variant: KernelVariant) -> pathlib.Path:
    return cache_dir() / f"{variant.symbol}.o"


def _encode(key: str, obj: bytes) -> bytes:
    k = key.encode()
    return _MAGIC + hashlib.sha256(obj).digest() + struct.pack("<I", len(k)) + k + obj


def _decode(key: str, data: bytes) -> bytes | None:
    head = len(_MAGIC) + 32 + 4
    if len(data) < head or not data.startswith(_MAGIC):
        return None
    digest = data[len(_MAGIC) : len(_MAGIC) + 32]
    (klen,) = struct.unpack("<I", data[head - 4 : head])
    if data[head : head + klen] != key.encode():
        return None
    obj = data[head + klen :]
    return obj if hashlib.sha256(obj).digest() == digest else None


def load_from_disk(variant: KernelVariant) -> bytes | None:
    path = _path(variant)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    obj = _decode(variant.key(), data)
    if obj is None:
        logger.warning("jax_fa4: ignoring corrupt kernel cache file %s", path)
    return obj


def store_to_disk(variant: KernelVariant, obj: bytes) -> None:
    path = _path(variant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_encode(variant.key(), obj))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache still works from memory
        logger.warning("jax_fa4: cannot write kernel cache %s: %s", path, e)


def _progress(msg: str) -> None:
    """First-use compiles take seconds each: say so on stderr (JAX_FA4_QUIET=1 silences;
    precompile reports per variant itself)."""
    if os.environ.get("JAX_FA4_QUIET", "") != "1":
        print(msg, file=sys.stderr, flush=True)


def get_object(variant: KernelVariant) -> bytes:
    """The compiled object for `variant`, compiling it if allowed and needed."""
    key = variant.key()
    with _lock:
        if (obj := _memory.get(key)) is not None:
            return obj
        obj = load_from_disk(variant)
        if obj is None:
            if compile_mode() == "never":
                raise MissingKernelError(
                    f"jax_fa4: kernel variant [{variant.describe()}] ({variant.symbol}) is not "
                    f"in the cache {cache_dir()} and JAX_FA4_COMPILE=never. Build it on a host "
                    "with jax_fa4[compile] (no GPU needed; copy the file to this cache if "
                    "that is another host): "
                    + _compiler.precompile_command(variant, cache_dir())
                )
            # Through the module, so that tests can stand in for the compiler.
            _progress(f"jax_fa4: compiling kernel [{variant.describe()}] for sm_90a "
                      f"(first use; cached in {cache_dir()}) ...")
            t0 = time.perf_counter()
            obj = _compiler.compile_variant(variant)
            _progress(f"jax_fa4: compiled in {time.perf_counter() - t0:.1f} s")
            store_to_disk(variant, obj)
        _memory[key] = obj
        return obj


def clear_memory_cache() -> None:
    with _lock:
        _memory.clear()
