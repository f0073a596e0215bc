"""jax_fa4.kernels: variants (keys, symbols, tiles), the compile -> disk -> memory
object cache, and the promise that CPU use never imports the CuTe DSL or FA4."""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from conftest import has_compiler

import jax_fa4
from jax_fa4.kernels import (ForwardVariant, MissingKernelError, TileConfig, cache,
                             get_object, sm90_forward_tile)
from jax_fa4.kernels import compile as kcompile
from jax_fa4.kernels import config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The one variant this module compiles for real.
VARIANT = ForwardVariant("bfloat16", 64, 64, 2, mask="causal")
ELF_MAGIC = b"\x7fELF"

needs_compiler = pytest.mark.skipif(not has_compiler(),
                                    reason="needs jax_fa4[compile] (flash_attn and cutlass)")


def run_python(code: str, env_extra: dict | None = None, timeout: int = 120):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------
# Variants: keys, symbols, validation
# ----------------------------------------------------------------------------

def test_key_and_symbol_are_deterministic():
    a = ForwardVariant("bfloat16", 128, 128, 4, mask="local", window_left=True, softcap=30.0,
                       has_sinks=True)
    b = ForwardVariant("bfloat16", 128, 128, 4, mask="local", window_left=True, softcap=30.0,
                       has_sinks=True)
    assert a == b and hash(a) == hash(b)
    assert a.key() == b.key() and a.symbol == b.symbol
    assert a.symbol.startswith("jax_fa4_fwd_")
    suffix = a.symbol[len("jax_fa4_fwd_"):]
    assert len(suffix) == 20 and all(c in "0123456789abcdef" for c in suffix)
    assert a.symbol.isidentifier()


def test_key_names_the_toolchain_and_every_field():
    v = ForwardVariant("float16", 96, 96, 2, mask="local", window_right=True, has_sinks=True)
    d = json.loads(v.key())
    assert d["kind"] == "sm90_forward"
    assert d["abi"] == config.LAUNCHER_ABI
    assert d["fa4"] == config.FA4_VERSION == "4.0.0b36"
    assert d["cutlass_dsl"] == config.CUTLASS_DSL_VERSION == "4.8.1"
    for f in dataclasses.fields(ForwardVariant):
        assert f.name in d
    tile = dataclasses.asdict(v.tile)
    assert tile.pop("design") == "fa4"  # left out for FA4's design: older keys stay valid
    assert tile.pop("persistent") is False  # ... and when not persistent
    assert tile.pop("ctas_per_sm") == 1  # ... and at one CTA per SM
    assert d["tile"] == tile
    assert v.key() == json.dumps(d, sort_keys=True)  # canonical


def test_symbol_is_stable_across_processes():
    """The symbol names cache files: it must not depend on the process (hash seeds)."""
    code = """
        from jax_fa4.kernels.config import ForwardVariant
        print(ForwardVariant("bfloat16", 128, 128, 4, mask="local", window_left=True,
                             softcap=30.0, has_sinks=True).symbol)
    """
    want = ForwardVariant("bfloat16", 128, 128, 4, mask="local", window_left=True,
                          softcap=30.0, has_sinks=True).symbol
    for seed in ("1", "2"):
        r = run_python(code, {"PYTHONHASHSEED": seed})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want


def test_equivalent_spellings_share_a_key():
    assert (ForwardVariant("bfloat16", 64, 64, 1, softcap=20).key()
            == ForwardVariant("bfloat16", 64, 64, 1, softcap=20.0).key())
    default = ForwardVariant("bfloat16", 64, 64, 1)
    explicit = ForwardVariant("bfloat16", 64, 64, 1, tile=sm90_forward_tile(64, 64, False, False))
    assert default.key() == explicit.key() and default.symbol == explicit.symbol


def test_every_field_changes_the_symbol():
    variants = [
        ForwardVariant(dtype, d, dv, g, mask=mask, window_left=wl, window_right=wr,
                       softcap=cap, has_sinks=sinks)
        for dtype, (d, dv), g, (mask, wl, wr), cap, sinks in itertools.product(
            ["bfloat16", "float16"],
            [(64, 64), (128, 128), (192, 128), (96, 96)],
            [1, 2, 8],
            [("none", False, False), ("causal", False, False), ("local", True, False),
             ("local", False, True), ("local", True, True)],
            [None, 20.0, 30.0],
            [False, True],
        )
    ]
    # Other tiles for one variant.
    base = variants[0]
    variants += [dataclasses.replace(base, tile=TileConfig(128, 128, True, True)),
                 dataclasses.replace(base, tile=TileConfig(192, 128, False, True)),
                 dataclasses.replace(base, tile=TileConfig(192, 128, True, False)),
                 dataclasses.replace(base, tile=TileConfig(192, 128, True, True, num_stages=3))]
    assert len(set(variants)) == len(variants)
    assert len({v.key() for v in variants}) == len(variants)
    assert len({v.symbol for v in variants}) == len(variants)
    assert len({v.describe() for v in variants[:-4]}) == len(variants) - 4


def test_dict_round_trip():
    v = ForwardVariant("float16", 192, 128, 4, mask="local", window_left=True,
                       window_right=True, softcap=15.0, has_sinks=True)
    d = json.loads(json.dumps(v.as_dict()))
    assert ForwardVariant.from_dict(d) == v
    assert ForwardVariant.from_dict(d).symbol == v.symbol


def _each_kind():
    """One variant of each kind, with nested configs and fields that are not the
    defaults (fields at their defaults may stay out of the key: TileConfig.design,
    BackwardVariant.deterministic, SplitVariant.prefetch)."""
    from jax_fa4.kernels.backward_config import BackwardVariant
    from jax_fa4.kernels.split import SplitVariant, decode_tile

    base = ForwardVariant("bfloat16", 128, 128, 8, has_seqused_k=True, tile=decode_tile(128, 64))
    return [(ForwardVariant("float16", 512, 512, 4, tile=config.hdim512_tile("split_pv")),
             "sm90_forward", "jax_fa4_fwd_"),
            (SplitVariant(base, combine="wide", pdl=True, prefetch=4), "sm90_forward_split",
             "jax_fa4_fwds_"),
            (BackwardVariant("bfloat16", 128, 128, 4, mask="causal", layout="packed",
                             has_seqused_k=True, deterministic=True),
             "sm90_backward", "jax_fa4_bwd_")]


@pytest.mark.parametrize("i", range(3))
def test_every_kind_builds_its_key_the_same_way(i):
    """Forward, split-KV and backward variants share one key recipe (kernels/variant.py):
    kind, ABI, pinned toolchain, source digest, fields; the symbol hashes the key."""
    v, kind, prefix = _each_kind()[i]
    d = json.loads(v.key())
    assert d["kind"] == kind and d["abi"] == type(v).ABI
    assert (d["fa4"], d["cutlass_dsl"]) == (config.FA4_VERSION, config.CUTLASS_DSL_VERSION)
    assert d["source"] == config.kernel_source_digest(*type(v).SOURCES)
    for f in dataclasses.fields(v):
        assert f.name in d
    assert v.symbol.startswith(prefix) and len(v.symbol) == len(prefix) + 20
    w = type(v).from_dict(json.loads(json.dumps(v.as_dict())))
    assert w == v and w.key() == v.key() and w.describe() == v.describe()


def test_split_key_names_its_base_and_combine():
    from jax_fa4.kernels.split import SplitVariant

    v = _each_kind()[1][0]
    d = json.loads(v.key())
    assert d["base_key"] == json.loads(v.base.key())
    assert d["combine_log_max_splits"] == 7
    # the prefetching kernel's code is one more module (kernels/forward_split_prefetch.py)
    assert d["prefetch_source"] == config.kernel_source_digest(*config.PREFETCH_SPLIT_SOURCES)
    unfused = SplitVariant(v.base, fused_combine=False)
    assert "prefetch" not in json.loads(unfused.key())  # keys from before the field
    assert unfused.describe() == v.base.describe() + ", split-KV"
    with pytest.raises(ValueError, match="prefetch needs"):
        SplitVariant(v.base, combine="wide", pdl=False, prefetch=4)


def test_backward_for_forward_carries_the_attention_fields():
    from jax_fa4.kernels.backward_config import BackwardVariant

    fv = ForwardVariant("float16", 192, 128, 1, mask="local", window_left=True, softcap=30,
                        has_sinks=True, q_layout="packed", kv_layout="packed",
                        has_seqused_q=True)
    bv = BackwardVariant.for_forward(fv)
    assert bv == BackwardVariant("float16", 192, 128, 1, mask="local", window_left=True,
                                 softcap=30.0, has_sinks=True, layout="packed",
                                 has_seqused_q=True)
    assert bv.describe() == ("sm90 bwd float16 hdim 192/128, group 1, local(left=y,right=n), "
                             "softcap 30, sinks, packed seqused q, tile 64x96")


def test_compile_does_not_import_the_cache():
    """cache.py calls compile.py; the reverse import would make a cycle."""
    import ast

    tree = ast.parse(open(kcompile.__file__).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                for a in n.names} | {n.module for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert "cache" not in imported
    assert cache.MissingKernelError is MissingKernelError is jax_fa4.MissingKernelError


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="float32"), "dtype"),
    (dict(dtype="bf16"), "dtype"),
    (dict(mask="sliding"), "mask"),
    (dict(mask="causal", window_left=True), "window"),
    (dict(mask="none", window_right=True), "window"),
    (dict(mask="local"), "window bound"),
])
def test_invalid_variants(kwargs, match):
    args = dict(dtype="bfloat16", head_dim=64, head_dim_v=64, qhead_per_kvhead=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ForwardVariant(**args)


def test_describe_and_pack_gqa():
    v = ForwardVariant("bfloat16", 192, 128, 4, mask="local", window_left=True, softcap=30.0,
                       has_sinks=True)
    text = v.describe()
    for part in ("sm90 fwd bfloat16", "hdim 192/128", "group 4", "local(left=y,right=n)",
                 "softcap 30", "sinks", "tile 128x96 rs"):
        assert part in text, (part, text)
    assert v.pack_gqa
    assert not ForwardVariant("float16", 64, 64, 1).pack_gqa
    assert ForwardVariant("float16", 64, 64, 1).describe() == (
        "sm90 fwd float16 hdim 64, group 1, none, tile 192x128 rs")


# ----------------------------------------------------------------------------
# Tiles (FA4 4.0.0b36's _tile_size_fwd_sm90)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("d,dv,causal,local,want", [
    (64, 64, False, False, (192, 128, True, True)),
    (64, 64, True, False, (192, 128, True, True)),
    (64, 64, False, True, (192, 128, True, True)),
    (96, 96, False, False, (192, 144, False, True)),
    (96, 96, True, False, (192, 128, False, True)),
    (96, 96, False, True, (192, 128, False, True)),
    (128, 128, False, False, (128, 128, True, True)),
    (128, 128, True, False, (128, 128, True, True)),
    (128, 128, False, True, (128, 128, True, True)),
    (192, 128, False, False, (128, 128, True, True)),
    (192, 128, True, False, (128, 128, True, True)),
    (192, 192, False, False, (128, 112, True, True)),
    (192, 192, False, True, (128, 96, True, True)),
    (192, 128, False, True, (128, 96, True, True)),
    (256, 256, False, False, (128, 80, True, True)),
    (256, 256, True, False, (128, 80, True, True)),
    (256, 256, False, True, (128, 64, True, True)),
    # between the benchmarked sizes: the next larger bucket
    (32, 32, False, False, (192, 128, True, True)),
    (72, 72, False, False, (192, 144, False, True)),
    (160, 160, False, False, (128, 112, True, True)),
    (224, 224, False, False, (128, 80, True, True)),
])
def test_sm90_forward_tile(d, dv, causal, local, want):
    t = sm90_forward_tile(d, dv, causal, local)
    assert (t.tile_m, t.tile_n, t.mma_pv_is_rs, t.intra_wg_overlap) == want
    assert t.num_stages == 2


def test_variant_picks_the_tile_for_its_mask():
    assert ForwardVariant("bfloat16", 96, 96, 1).tile.tile_n == 144
    assert ForwardVariant("bfloat16", 96, 96, 1, mask="causal").tile.tile_n == 128
    assert ForwardVariant("bfloat16", 256, 256, 1, mask="local", window_left=True).tile.tile_n == 64


# ----------------------------------------------------------------------------
# The object cache
# ----------------------------------------------------------------------------

class Compiles:
    """Stands in for compile_variant: records calls, returns `obj` (or raises)."""

    def __init__(self, obj=None):
        self.obj = obj
        self.calls = []

    def __call__(self, variant, **kwargs):
        self.calls.append(variant)
        if self.obj is None:
            raise AssertionError(f"compile_variant called for {variant.describe()}")
        return self.obj


FAKE_OBJECT = ELF_MAGIC + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def precompiled(tmp_path_factory):
    """(cache dir, object): VARIANT really compiled (once per module) through get_object."""
    if not has_compiler():
        pytest.skip("needs jax_fa4[compile] (flash_attn and cutlass)")
    path = tmp_path_factory.mktemp("precompiled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_FA4_CACHE_DIR", str(path))
        mp.delenv("JAX_FA4_COMPILE", raising=False)
        cache.clear_memory_cache()
        try:
            obj = get_object(VARIANT)
        finally:
            cache.clear_memory_cache()
    return path, obj


@pytest.mark.compile
@needs_compiler
def test_compiled_object(precompiled):
    path, obj = precompiled
    assert obj[:4] == ELF_MAGIC
    assert len(obj) > 10_000
    assert VARIANT.symbol.encode() in obj  # the launcher's symbol prefix
    f = path / f"{VARIANT.symbol}.o"
    assert sorted(p.name for p in path.iterdir()) == [f.name]  # no temporary files left
    raw = f.read_bytes()
    assert raw.startswith(b"JAXFA4K1")
    assert VARIANT.key().encode() in raw[:4096]
    assert raw.endswith(obj)


@pytest.mark.compile
@needs_compiler
def test_memory_hit_then_disk_hit(precompiled, kernel_cache, monkeypatch):
    src, obj = precompiled
    kernel_cache.mkdir(parents=True)
    shutil.copy(src / f"{VARIANT.symbol}.o", kernel_cache)
    no_compile = Compiles()
    monkeypatch.setattr(kcompile, "compile_variant", no_compile)

    first = get_object(VARIANT)  # from disk
    assert first == obj
    (kernel_cache / f"{VARIANT.symbol}.o").unlink()
    assert get_object(VARIANT) is first  # from memory: the file is gone
    cache.clear_memory_cache()
    with pytest.raises(AssertionError, match="compile_variant called"):
        get_object(VARIANT)  # neither memory nor disk: compiles
    assert len(no_compile.calls) == 1


@pytest.mark.compile
@needs_compiler
def test_fresh_memory_cache_hits_disk_without_compiling(precompiled, monkeypatch):
    path, obj = precompiled
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(path))
    monkeypatch.setattr(kcompile, "compile_variant", Compiles())
    cache.clear_memory_cache()
    try:
        assert get_object(VARIANT) == obj
    finally:
        cache.clear_memory_cache()


def test_miss_compiles_stores_and_remembers(kernel_cache, monkeypatch):
    fake = Compiles(FAKE_OBJECT)
    monkeypatch.setattr(kcompile, "compile_variant", fake)
    v = ForwardVariant("float16", 128, 128, 1, has_sinks=True)
    assert get_object(v) == FAKE_OBJECT
    assert get_object(v) == FAKE_OBJECT
    assert fake.calls == [v]
    assert cache.load_from_disk(v) == FAKE_OBJECT
    assert [p.name for p in kernel_cache.iterdir()] == [f"{v.symbol}.o"]


def _corruptions(v: ForwardVariant, good: bytes):
    other = ForwardVariant("float16", 64, 64, 1)
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF
    header_flip = bytearray(good)
    header_flip[len(b"JAXFA4K1") + 3] ^= 0x01  # the digest
    return {
        "payload-bit-flip": bytes(flipped),
        "digest-bit-flip": bytes(header_flip),
        "truncated": good[: len(good) // 2],
        "header-only": good[:20],
        "empty": b"",
        "garbage": os.urandom(4096),
        "bare-object": FAKE_OBJECT,  # an object without our header
        "wrong-magic": b"JAXFA4K0" + good[8:],
        "foreign-key": cache._encode(other.key(), FAKE_OBJECT),  # another variant's file
    }


@pytest.mark.parametrize("kind", ["payload-bit-flip", "digest-bit-flip", "truncated",
                                  "header-only", "empty", "garbage", "bare-object",
                                  "wrong-magic", "foreign-key"])
def test_corrupt_disk_file_is_ignored_and_rebuilt(kind, kernel_cache, monkeypatch, caplog):
    v = VARIANT
    fake = Compiles(FAKE_OBJECT)
    monkeypatch.setattr(kcompile, "compile_variant", fake)
    cache.store_to_disk(v, FAKE_OBJECT)
    f = kernel_cache / f"{v.symbol}.o"
    good = f.read_bytes()
    assert cache.load_from_disk(v) == FAKE_OBJECT
    f.write_bytes(_corruptions(v, good)[kind])

    with caplog.at_level(logging.WARNING, logger="jax_fa4"):
        assert cache.load_from_disk(v) is None
        assert get_object(v) == FAKE_OBJECT
    assert fake.calls == [v]  # rebuilt once
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert f.read_bytes() == good  # the rebuilt file replaced the bad one
    assert cache.load_from_disk(v) == FAKE_OBJECT


def test_compile_never_raises_missing_kernel_error(kernel_cache, monkeypatch):
    monkeypatch.setenv("JAX_FA4_COMPILE", "never")
    monkeypatch.setattr(kcompile, "compile_variant", Compiles())
    v = ForwardVariant("bfloat16", 256, 256, 8, mask="local", window_left=True,
                       window_right=True, softcap=50.0, has_sinks=True)
    with pytest.raises(MissingKernelError) as e:
        get_object(v)
    msg = str(e.value)
    assert v.describe() in msg
    assert v.symbol in msg
    assert str(kernel_cache) in msg
    assert "JAX_FA4_COMPILE=never" in msg
    assert isinstance(e.value, RuntimeError)
    assert jax_fa4.MissingKernelError is MissingKernelError

    # Once the object is on disk, "never" loads it.
    cache.store_to_disk(v, FAKE_OBJECT)
    assert get_object(v) == FAKE_OBJECT


def test_compile_mode_is_case_insensitive_and_validated(kernel_cache, monkeypatch):
    monkeypatch.setenv("JAX_FA4_COMPILE", "NEVER")
    assert cache.compile_mode() == "never"
    monkeypatch.setenv("JAX_FA4_COMPILE", "Auto")
    assert cache.compile_mode() == "auto"
    monkeypatch.setenv("JAX_FA4_COMPILE", "sometimes")
    monkeypatch.setattr(kcompile, "compile_variant", Compiles())
    with pytest.raises(ValueError, match="JAX_FA4_COMPILE"):
        get_object(ForwardVariant("bfloat16", 64, 64, 1))


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("JAX_FA4_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "jax_fa4" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "jax_fa4" / "kernels"


def test_unwritable_cache_still_works_from_memory(kernel_cache, monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv("JAX_FA4_CACHE_DIR", str(blocker / "kernels"))  # cannot be created
    fake = Compiles(FAKE_OBJECT)
    monkeypatch.setattr(kcompile, "compile_variant", fake)
    v = ForwardVariant("bfloat16", 64, 64, 1)
    with caplog.at_level(logging.WARNING, logger="jax_fa4"):
        assert get_object(v) == FAKE_OBJECT
        assert get_object(v) == FAKE_OBJECT
    assert len(fake.calls) == 1
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_cache_files_honor_the_umask(kernel_cache):
    old = os.umask(0o022)
    try:
        cache.store_to_disk(VARIANT, FAKE_OBJECT)
    finally:
        os.umask(old)
    mode = stat.S_IMODE((kernel_cache / f"{VARIANT.symbol}.o").stat().st_mode)
    assert mode == 0o644


def test_concurrent_thread_writers_leave_a_valid_file(kernel_cache):
    v = VARIANT
    objs = [FAKE_OBJECT + bytes([i]) * 1000 for i in range(4)]  # all valid, different
    errors = []
    start = threading.Barrier(len(objs))

    def writer(obj):
        try:
            start.wait()
            for _ in range(25):
                cache.store_to_disk(v, obj)
                got = cache.load_from_disk(v)
                if got not in objs:  # a reader never sees a partial or mixed file
                    errors.append("bad read")
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(o,)) for o in objs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert cache.load_from_disk(v) in objs
    assert [p.name for p in kernel_cache.iterdir()] == [f"{v.symbol}.o"]


def test_concurrent_process_writers_leave_a_valid_file(kernel_cache):
    v = VARIANT
    kernel_cache.mkdir(parents=True)
    obj_file = kernel_cache.parent / "obj.bin"
    obj_file.write_bytes(FAKE_OBJECT * 8)
    code = f"""
        import pathlib
        from jax_fa4.kernels import cache
        from jax_fa4.kernels.config import ForwardVariant
        v = ForwardVariant.from_dict({v.as_dict()!r})
        obj = pathlib.Path({str(obj_file)!r}).read_bytes()
        bad = 0
        for _ in range(40):
            cache.store_to_disk(v, obj)
            bad += cache.load_from_disk(v) != obj
        print("bad", bad)
    """
    env = dict(os.environ, JAX_FA4_CACHE_DIR=str(kernel_cache))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.split() == ["bad", "0"]
    assert cache.load_from_disk(v) == FAKE_OBJECT * 8
    assert [p.name for p in kernel_cache.iterdir()] == [f"{v.symbol}.o"]


def test_get_object_serializes_concurrent_callers(kernel_cache, monkeypatch):
    """Threads asking for the same missing variant compile it once."""
    fake = Compiles(FAKE_OBJECT)
    monkeypatch.setattr(kcompile, "compile_variant", fake)
    v = ForwardVariant("bfloat16", 128, 128, 2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(get_object(v))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [FAKE_OBJECT] * 8
    assert len(fake.calls) == 1


# ----------------------------------------------------------------------------
# The toolchain check
# ----------------------------------------------------------------------------

def test_check_toolchain_names_what_is_missing(monkeypatch):
    import importlib.metadata as md

    def fake_version(dist):
        if dist == "flash-attn-4":
            raise md.PackageNotFoundError(dist)
        return "0.0.1"

    monkeypatch.setattr(kcompile.importlib.metadata, "version", fake_version)
    with pytest.raises(MissingKernelError) as e:
        kcompile.check_toolchain()
    msg = str(e.value)
    assert "flash-attn-4 is not installed" in msg
    assert "nvidia-cutlass-dsl 0.0.1 is installed, jax_fa4 needs 4.8.1" in msg
    with pytest.raises(MissingKernelError):
        kcompile.compile_variant(VARIANT)


# ----------------------------------------------------------------------------
# No CuTe DSL / FA4 import on CPU
# ----------------------------------------------------------------------------

def test_cpu_use_does_not_import_the_compiler():
    r = run_python("""
        import sys
        import jax, jax.numpy as jnp
        import jax_fa4
        q = jnp.ones((1, 16, 4, 64), jnp.bfloat16)
        k = jnp.ones((1, 16, 2, 64), jnp.bfloat16)
        s = jnp.zeros((4,), jnp.float32)
        jax_fa4.attention(q, k, k).block_until_ready()
        jax.jit(lambda q, k, s: jax_fa4.attention(q, k, k, is_causal=True, sinks=s,
                                                  local_window_size=(3, 0)))(q, k, s)
        jax.grad(lambda q: jax_fa4.attention(q, k, k).astype(jnp.float32).sum())(q)
        assert jax_fa4.explain(q, k, k, platform="cuda") is None
        assert jax_fa4.is_supported(q, k, k, platform="cuda")
        bad = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("cutlass", "flash_attn", "torch")
                     or m == "jax_fa4.kernels.forward")
        assert not bad, bad
        print("ok")
    """, {"JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"


@pytest.mark.compile
@needs_compiler
def test_precompiled_kernels_lower_without_the_compiler(precompiled):
    """A populated cache (JAX_FA4_COMPILE=never) lowers the custom call without
    importing cutlass or flash_attn: GPU hosts need no toolchain."""
    path, _ = precompiled
    r = run_python("""
        import sys
        import jax, jax.numpy as jnp
        import jax_fa4
        q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
        k = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)
        f = lambda q, k, v: jax_fa4.attention(q, k, v, is_causal=True)
        text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @jax_fa4_cute_call") == 1
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("cutlass", "flash_attn"))
        assert not bad, bad
        print("ok")
    """, {"JAX_FA4_CACHE_DIR": str(path), "JAX_FA4_COMPILE": "never"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok"


def test_every_kernel_module_is_digested_or_planning_only():
    """A new kernel module must join a *_SOURCES digest (config.py) or be pure planning,
    or cached objects built from its old code would be loaded."""
    import pathlib

    from jax_fa4.kernels import config

    here = pathlib.Path(config.__file__).parent
    digested = set(config.FORWARD_SOURCES + config.SPLIT_SOURCES + config.FUSED_SPLIT_SOURCES
                   + config.PREFETCH_SPLIT_SOURCES + config.PERSISTENT_SOURCES
                   + config.OCCUPANCY_SOURCES
                   + config.BACKWARD_SOURCES)
    planning = {"__init__.py", "variant.py", "config.py", "split.py", "backward_config.py",
                "errors.py", "cache.py", "compile.py"}
    assert {p.name for p in here.glob("*.py")} == digested | planning
