"""A missing kernel names the command that builds exactly it: MissingKernelError's
message (JAX_FA4_COMPILE=never) carries `python -m jax_fa4.precompile --cache-dir DIR
--variant JSON`, and that command builds that variant (same key, same file)."""
from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from conftest import has_compiler

from jax_fa4 import precompile
from jax_fa4.kernels import ForwardVariant, MissingKernelError, cache, get_object
from jax_fa4.kernels import compile as kcompile
from jax_fa4.kernels.backward_config import BackwardVariant
from jax_fa4.kernels.split import SplitVariant, decode_tile

FAKE_OBJECT = b"\x7fELF" + bytes(range(256)) * 16


def each_kind():
    base = ForwardVariant("bfloat16", 128, 128, 8, has_seqused_k=True, tile=decode_tile(128, 64))
    return [ForwardVariant("float16", 192, 128, 4, mask="local", window_left=True,
                           softcap=15.0, has_sinks=True),
            SplitVariant(base, fused_combine=False),
            BackwardVariant("bfloat16", 128, 128, 4, mask="causal", layout="packed",
                            has_seqused_k=True)]


@pytest.mark.parametrize("v", each_kind(), ids=lambda v: v.KIND)
def test_spec_round_trip(v):
    spec = kcompile.variant_spec(v)
    assert "\n" not in spec and "'" not in spec  # one shell word once single-quoted
    w = kcompile.variant_from_spec(spec)
    assert type(w) is type(v) and w == v and w.symbol == v.symbol


@pytest.mark.parametrize("spec", ['{"kind":"sm90_nope","dtype":"bfloat16"}', "[1]", '"x"'])
def test_bad_spec_names_the_kinds(spec):
    with pytest.raises(ValueError, match="sm90_forward"):
        kcompile.variant_from_spec(spec)


def missing_command(v, monkeypatch) -> list[str]:
    """The argv (after `python`) that MissingKernelError gives for `v`."""
    monkeypatch.setenv("JAX_FA4_COMPILE", "never")
    with pytest.raises(MissingKernelError) as e:
        get_object(v)
    msg = str(e.value)
    assert "python -m jax_fa4.precompile " in msg
    argv = shlex.split(msg[msg.index("python -m jax_fa4.precompile "):])
    assert argv[:3] == ["python", "-m", "jax_fa4.precompile"]
    return argv[3:]


@pytest.mark.parametrize("v", each_kind(), ids=lambda v: v.KIND)
def test_missing_kernel_command_names_exactly_that_variant(v, kernel_cache, monkeypatch,
                                                           capsys):
    """The command parses back to `v` in the cache the error named: with `v`'s object
    already there, precompile finds nothing to build (no compiler needed)."""
    args = missing_command(v, monkeypatch)
    assert args[args.index("--cache-dir") + 1] == str(kernel_cache)
    cache.store_to_disk(v, FAKE_OBJECT)
    capsys.readouterr()
    monkeypatch.delenv("JAX_FA4_QUIET", raising=False)  # main sets it: undone after
    assert precompile.main(args) == 0
    assert "1 variants, 1 cached, 0 to build" in capsys.readouterr().out


def test_check_lists_missing_variants_and_builds_nothing(kernel_cache, monkeypatch, capsys):
    """--check: exit 1 naming what is missing, 0 once it is there; never compiles (the
    cache holds a fake object, and nothing is written for the missing one)."""
    v = ForwardVariant("bfloat16", 128, 128, 1, mask="causal")
    w = ForwardVariant("bfloat16", 128, 128, 1, mask="none")
    monkeypatch.delenv("JAX_FA4_QUIET", raising=False)
    cache.store_to_disk(v, FAKE_OBJECT)
    specs = [a for x in (v, w) for a in ("--variant", kcompile.variant_spec(x))]
    capsys.readouterr()
    assert precompile.main(["--check", *specs]) == 1
    out = capsys.readouterr().out
    assert "2 variants, 1 cached, 1 missing" in out
    assert f"missing: {w.describe()}" in out and v.describe() not in out.split("missing:", 1)[1]
    assert cache.load_from_disk(w) is None  # nothing built
    cache.store_to_disk(w, FAKE_OBJECT)
    assert precompile.main(["--check", *specs]) == 0


def test_variant_and_calls_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        precompile.main(["--calls", "x.py", "--variant", "{}"])


@pytest.mark.compile
@pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")
def test_missing_kernel_command_builds_it(tmp_path, monkeypatch):
    """Run as printed (in a space-containing cache path), the command builds the object
    that JAX_FA4_COMPILE=never then loads."""
    cache_dir = tmp_path / "kernel cache"
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(cache_dir))
    cache.clear_memory_cache()
    v = ForwardVariant("float16", 64, 64, 1, mask="causal")
    args = missing_command(v, monkeypatch)
    r = subprocess.run([sys.executable, "-m", "jax_fa4.precompile", "--jobs", "1", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "0 failed" in r.stdout
    try:
        assert get_object(v)[:4] == b"\x7fELF"  # still JAX_FA4_COMPILE=never
    finally:
        cache.clear_memory_cache()
