"""What every compiled kernel variant shares: its key, symbol, description and dict form.

A variant's key names its cached object (kernels/cache.py) and, hashed, the launcher's
symbol in that object.  The forward, split-KV and backward variants must all build it
the same way -- kind, launcher ABI, the pinned FA4 and CuTe DSL versions, a digest of
the kernel sources, then the variant's own fields -- or an object built by other code
could be loaded under the wrong name.  So the recipe lives here, once, and the variant
classes only declare their constants and fields (as FA4's flash_attn/cute/config.py
turns a typed config into its kernel key).

`AttentionVariant` holds the fields the forward and the backward kernels both
specialize on (dtype, head dims, GQA group, mask, softcap, sinks), so that a backward
is derived from its forward field by field (BackwardVariant.for_forward) and both
describe those fields in the same words.

Pure Python: nothing here imports cutlass or flash_attn, so the dispatch layer can name
a variant on hosts without the compiler.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib
import typing
from typing import ClassVar

# FA4 and the CuTe DSL are pinned: our launchers depend on their internals, and
# a kernel object built by other versions must never be mistaken for ours.
FA4_VERSION = "4.0.0b36"
CUTLASS_DSL_VERSION = "4.8.1"

DTYPES = ("bfloat16", "float16")
MASKS = ("none", "causal", "local")


@functools.cache
def kernel_source_digest(*names: str) -> str:
    """A digest of the named kernel source files of jax_fa4/kernels.  It is part of
    every variant's key, so a cached object built by other kernel code (an older
    checkout, a branch) is never loaded: it is rebuilt, or reported missing where
    compiling is off.  Reads files only; imports nothing."""
    h = hashlib.sha256()
    here = pathlib.Path(__file__).parent
    for name in sorted(names):
        h.update(name.encode() + b"\0" + (here / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _plain(value):
    """A field value as JSON-ready data: nested configs by their own `as_dict` (which may
    leave out defaults that older keys lack), other dataclasses field by field."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


@functools.cache
def _nested_fields(cls) -> dict[str, type]:
    """The fields of `cls` that hold a dataclass (a tile, a base variant), with that
    class: read from the field declarations, so a new nested field needs no code here."""
    hints = typing.get_type_hints(cls)
    nested = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        for t in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(t):
                nested[f.name] = t
    return nested


class KernelVariant:
    """Base of the frozen dataclasses that name one compiled launcher.

    A subclass sets KIND, ABI (bumped when its launcher's argument convention changes),
    SOURCES (the kernel modules whose code it compiles, see kernel_source_digest) and
    SYMBOL_PREFIX, and lists its description in `describe_parts`.  `key_extras` adds
    entries to the key beyond the fields (the split kernel's combine and base key).
    """

    KIND: ClassVar[str]
    ABI: ClassVar[int]
    SOURCES: ClassVar[tuple[str, ...]]
    SYMBOL_PREFIX: ClassVar[str]

    def as_dict(self) -> dict:
        """The fields as JSON-ready data: the key's body, and what precompile sends to
        its worker processes (with the class) to rebuild the variant there."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        """The inverse of as_dict.  A nested config that is missing or None stays at its
        default (the tile heuristic picks it)."""
        d = dict(d)
        for name, sub in _nested_fields(cls).items():
            if name in d:
                value = d[name]
                if not value:
                    d[name] = None
                elif hasattr(sub, "from_dict"):
                    d[name] = sub.from_dict(value)
                else:
                    d[name] = sub(**value)
        return cls(**d)

    def key_extras(self) -> dict:
        return {}

    def key(self) -> str:
        """Canonical text naming the variant and the toolchain that builds it."""
        return json.dumps(
            {
                "kind": self.KIND,
                "abi": self.ABI,
                "fa4": FA4_VERSION,
                "cutlass_dsl": CUTLASS_DSL_VERSION,
                "source": kernel_source_digest(*self.SOURCES),
                **self.key_extras(),
                **self.as_dict(),
            },
            sort_keys=True,
        )

    @property
    def symbol(self) -> str:
        """The launcher's symbol prefix in the object (and the cache file's name);
        unique per key."""
        return self.SYMBOL_PREFIX + hashlib.sha256(self.key().encode()).hexdigest()[:20]

    def describe_parts(self) -> list[str]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and errors (a missing kernel names it)."""
        return ", ".join(self.describe_parts())


@dataclasses.dataclass(frozen=True)
class AttentionVariant(KernelVariant):
    """The fields FA4's SM90 forward and backward both specialize on.

    mask: "none", "causal" (bottom-right aligned, as FA4) or "local" (a window whose
    bounds are runtime int32 arguments; `window_left`/`window_right` say which bounds
    exist, a missing one is unbounded).  softcap: tanh logit cap, or None.
    """

    # "fwd" or "bwd": the direction word of `describe`.
    DIRECTION: ClassVar[str]

    dtype: str
    head_dim: int
    head_dim_v: int
    qhead_per_kvhead: int
    mask: str = "none"
    window_left: bool = False
    window_right: bool = False
    softcap: float | None = None
    has_sinks: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {self.mask!r}")
        if self.mask != "local" and (self.window_left or self.window_right):
            raise ValueError("window bounds are only meaningful for mask='local'")
        if self.mask == "local" and not (self.window_left or self.window_right):
            raise ValueError("mask='local' needs at least one window bound")
        if self.softcap is not None:  # 30 and 30.0 must give one key
            object.__setattr__(self, "softcap", float(self.softcap))

    def attention_fields(self) -> dict:
        """The values of AttentionVariant's fields (what a backward takes from its
        forward)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AttentionVariant)}

    def describe_parts(self) -> list[str]:
        parts = [
            f"sm90 {self.DIRECTION} {self.dtype} hdim {self.head_dim}"
            + (f"/{self.head_dim_v}" if self.head_dim_v != self.head_dim else ""),
            f"group {self.qhead_per_kvhead}",
            self.mask
            + (
                f"(left={'y' if self.window_left else 'n'},right={'y' if self.window_right else 'n'})"
                if self.mask == "local"
                else ""
            ),
        ]
        if self.softcap is not None:
            parts.append(f"softcap {self.softcap:g}")
        if self.has_sinks:
            parts.append("sinks")
        return parts
