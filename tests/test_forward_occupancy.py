"""FA4's forward at two CTAs per SM (kernels/forward_occupancy.py, TileConfig.ctas_per_sm)
on CPU: only 64-row FA4 tiles whose shared memory fits twice are accepted, every other
key is unchanged, no call is planned with it (a tile-sweep candidate), and the compiled
kernel asks for two resident CTAs: PTX `.minnctapersm 2`, setmaxnreg 40 / 216, and
ptxas fits it in 128 registers a thread without spilling."""
import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest

from jax_fa4.dispatch import DenseCall, plan_dense
from jax_fa4.kernels import ForwardVariant, TileConfig, config

sys.path.insert(0, os.path.dirname(__file__))
from kernel_dump import kernel_dumps  # noqa: E402
from test_lowering import compiles  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def two_per_sm(tm=64, tn=128, stages=1):
    return TileConfig(tm, tn, True, True, num_stages=stages, ctas_per_sm=2)


def test_tile_rules():
    with pytest.raises(ValueError, match="1 or 2"):
        TileConfig(64, 128, True, True, ctas_per_sm=3)
    with pytest.raises(ValueError, match="64-row tile"):
        TileConfig(128, 128, True, True, ctas_per_sm=2)
    with pytest.raises(ValueError, match="64-row tile"):
        TileConfig(64, 64, True, True, num_stages=1, design="split_k", ctas_per_sm=2)
    with pytest.raises(ValueError, match="64-row tile"):
        TileConfig(64, 128, True, True, persistent=True, ctas_per_sm=2)


@pytest.mark.parametrize("tn,stages,fits", [(128, 1, True), (64, 2, True), (128, 2, False),
                                            (176, 1, True), (64, 4, False)])
def test_shared_memory_must_fit_twice(tn, stages, fits):
    """Two CTAs of 64 x 128 with one K/V stage (80 KiB each) fit an SM's 228 KiB; with two
    stages (144 KiB) they do not, and the variant is refused."""
    tile = two_per_sm(tn=tn, stages=stages)
    assert config.occupancy_tile_fits(tile, 128, 128) is fits
    make = lambda: ForwardVariant("bfloat16", 128, 128, 1, mask="causal", tile=tile)  # noqa: E731
    if fits:
        assert make().tile.ctas_per_sm == 2
    else:
        with pytest.raises(ValueError, match="shared memory"):
            make()


def test_keys_and_plans():
    """One CTA per SM keeps every earlier key; two name the module's source; no call is
    planned with two (it is a tile-sweep candidate)."""
    plain = ForwardVariant("bfloat16", 128, 128, 1, mask="causal",
                           tile=TileConfig(64, 128, True, True, num_stages=1))
    two = dataclasses.replace(plain, tile=dataclasses.replace(plain.tile, ctas_per_sm=2))
    assert "ctas_per_sm" not in plain.key() and "occupancy_source" not in plain.key()
    assert '"ctas_per_sm": 2' in two.key() and "occupancy_source" in two.key()
    assert two.symbol != plain.symbol and "2/SM" in two.describe()
    assert ForwardVariant.from_dict(two.as_dict()) == two
    for d in (64, 96, 128, 256):
        for window in ((None, 0), (None, None)):
            c = DenseCall(dtype="bfloat16", batch=64, seq_q=512, seq_k=512, heads_q=16,
                          heads_k=16, head_dim=d, head_dim_v=d, window=window)
            assert plan_dense(c).variant.tile.ctas_per_sm == 1


def test_the_tile_sweep_checks_its_outputs():
    """bench_forward's sweep carries the two-per-SM tiles (with their one-CTA control)
    and records each tile's error against FA4's tile."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench_forward

    tiles = {v.tile for _, v in bench_forward.sweep_variants("/SM,1 stage")}
    assert two_per_sm() in tiles and two_per_sm(64, 64, 2) in tiles
    assert TileConfig(64, 128, True, True, num_stages=1) in tiles
    assert TileConfig(128, 128, True, True) in tiles  # the reference
    assert "rel_err_vs_first_tile" in open(bench_forward.__file__).read()


def _ptxas():
    """ptxas from CUDA or Triton's wheel (jax_fa4[compile] installs it), or None."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "ptxas")
    except ImportError:
        bundled = None
    return shutil.which("ptxas") or (bundled if bundled and os.path.exists(bundled) else None)


@compiles
@pytest.mark.parametrize("tn,stages", [(128, 1), (64, 2)])
def test_compiled_kernel_asks_for_two_ctas_per_sm(tmp_path, tn, stages):
    v = ForwardVariant("bfloat16", 128, 128, 1, mask="causal", tile=two_per_sm(64, tn, stages))
    (ptx,) = kernel_dumps(tmp_path, v)
    assert re.search(r"\.minnctapersm 2\b", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", ptx)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+216;", ptx)
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no ptxas to count registers")
    # the DSL writes the newest PTX ISA (9.x); the kernel needs 8.6+ (shared::cta
    # operands), which CUDA 12.9 (Triton's ptxas) and 13 both read
    src = tmp_path / "k.ptx"
    src.write_text(re.sub(r"^\.version \d+\.\d+", ".version 8.8", ptx, flags=re.M))
    r = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)]
    assert regs and max(regs) <= 128, r.stderr[-2000:]  # two CTAs x 256 threads x 128 = 64K
    assert "0 bytes spill stores, 0 bytes spill loads" in r.stderr, r.stderr[-2000:]
