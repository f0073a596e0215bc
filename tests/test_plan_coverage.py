"""Plan-space coverage (CPU): every kernel class the dispatcher can reach
(tests/plan_space.py) has a case in the GPU matrix files, and the cp.async page loader
is never given a tile it overruns (the cause of the head-dim-96/160/224 paged bugs)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import plan_space  # noqa: E402
from jax_fa4.dispatch import VarlenCall, plan_varlen  # noqa: E402
from jax_fa4.kernels import split  # noqa: E402
from jax_fa4.kernels.config import (SM90_SMEM_BYTES, ForwardVariant, TileConfig,  # noqa: E402
                                    cp_async_rows_per_pass, cp_async_tile, fa4_smem_bytes)


@pytest.fixture(scope="module")
def reach():
    return plan_space.reachable()


def test_every_reachable_class_has_a_gpu_case(reach):
    covered = plan_space.matrix_classes()
    missing = sorted(set(reach) - set(covered))
    assert not missing, (
        f"{len(missing)} reachable kernel classes have no GPU case; add cases "
        "(`python tests/plan_space.py --emit` prints some) to tests/gpu_cases_coverage.py "
        "or stop the dispatcher from reaching them:\n"
        + "\n".join(f"  {c}  e.g. {reach[c]}" for c in missing[:20]))


@pytest.mark.parametrize("name", [n for n in split.SPLIT_PLANS if n != split.DEFAULT_PLAN])
def test_every_split_plan_is_covered_too(name, monkeypatch):
    """Each other split plan (kernels/split.SPLIT_PLANS: other decode tiles, combines
    and launches) runs other kernels than the default for some calls: every class of
    those calls has a GPU case under that plan, so the GPU run that validates it
    (JAX_FA4_PLAN_DIFF=<default>,<name> JAX_FA4_SPLIT_PLAN=<name>) covers them."""
    monkeypatch.setattr(split, "PLAN", split.SPLIT_PLANS[name])
    reach = plan_space.reachable(differing_from=split.DEFAULT_PLAN)
    missing = sorted(set(reach) - set(plan_space.matrix_classes()))
    assert not missing, "\n".join(f"  {c}  e.g. {reach[c]}" for c in missing[:20])
    plan = split.SPLIT_PLANS[name]
    want = (f"split_{plan.combine}" + ("_pdl" if plan.pdl else "")
            + ("_prefetch" if plan.prefetch else ""))
    assert want in {c[3] for c in reach if c[0] == "structure"}


def test_persistent_forward_is_covered_too():
    """With the persistent dense forward switched on (kernels/config.py), every class it
    reaches has a GPU case planned persistent too, so the GPU run that validates it
    (JAX_FA4_PLAN_DIFF=<default>,<default>+persistent) covers them."""
    from jax_fa4.kernels import config

    with config.use_forward_persistent(True):
        reach = plan_space.reachable()
        covered = plan_space.matrix_classes()
    # the classes the switch changes; the others are the default run's
    persistent = {c for c in reach if c[0] == "structure" and "persistent" in c[4]}
    assert persistent, "the walk reaches the persistent kernel"
    missing = sorted(persistent - set(covered))
    assert not missing, "\n".join(f"  {c}  e.g. {reach[c]}" for c in missing[:20])


def test_two_ctas_per_sm_is_never_planned(reach):
    """TileConfig.ctas_per_sm = 2 (kernels/forward_occupancy.py) is a tile-sweep
    candidate only: no GPU matrix case runs it, so no reachable class may use it (with
    the persistent switch on as well)."""
    from jax_fa4.kernels import config

    with config.use_forward_persistent(True):
        reach_persistent = plan_space.reachable()
    for r in (reach, reach_persistent):
        assert not [c for c in r if "persm" in str(c)]


def test_space_is_walked(reach):
    """The walk reaches every path, split kind and the head-dim-512 design."""
    kinds = {c[1:4] for c in reach if c[0] == "structure"}
    paths = {k[0] for k in kinds}
    assert paths == {"dense", "packed", "paged_tma", "paged_cpasync"}
    assert {k[2] for k in kinds} == {"unsplit", f"split_{split.PLAN.combine}",
                                     "split_jax_merge"}
    assert any("split_k" in c[4] for c in reach if c[0] == "structure")
    assert any(c[0] == "bwd_tile" for c in reach)


def test_no_paged_cp_async_plan_overruns_its_tile(reach):
    for cls in reach:
        if cls[0] == "structure" and cls[1] == "paged_cpasync":
            tile_n = int(cls[4].split("x")[1].split("r")[0].split("s")[0])
            rows = int(cls[5][len("rows"):])
            assert tile_n % rows == 0, cls


@pytest.mark.parametrize("hd,tile_n,want", [(96, 144, 128), (160, 112, 96), (224, 80, 64),
                                            (144, 112, 64), (128, 128, 128), (256, 80, 80)])
def test_cp_async_tile_rounds_to_loader_passes(hd, tile_n, want):
    t = cp_async_tile(TileConfig(128, tile_n, True, True), hd, hd)
    assert t.tile_n == want and t.tile_n % cp_async_rows_per_pass(hd, hd) == 0


def test_variant_refuses_a_tile_the_loader_overruns():
    with pytest.raises(ValueError, match="multiple of 32"):
        ForwardVariant("bfloat16", 224, 224, 1, kv_layout="paged", has_seqused_k=True,
                       tile=TileConfig(128, 80, True, True))


@pytest.mark.parametrize("hd,ps,mask,tile_n", [(96, 256, (None, None), 128),
                                               (224, 8, (None, None), 64),
                                               (160, 128, (None, 0), 96),
                                               (96, 144, (None, None), 144)])  # TMA: 144 ok
def test_issue_repros_plan_safe_tiles(hd, ps, mask, tile_n):
    c = VarlenCall("bfloat16", "dense", "paged", 2, 16, 4, 2, hd, hd, ps * 50, mask,
                   has_seqused_k=True, page_size=ps, max_pages=50, num_splits=1)
    assert plan_varlen(c).variant.tile.tile_n == tile_n


def test_fa4_tiles_fit_shared_memory():
    """Every reachable FA4-design plan's Q, K/V stages and P fit SM90's 227 KiB (FA4
    stages O in the Q tile, so the value head dim never exceeds the key's)."""
    from jax_fa4.dispatch import plan_dense, plan_varlen
    from jax_fa4.dispatch import Unsupported as U
    for planner, calls in ((plan_dense, plan_space._dense_calls()),
                           (plan_varlen, plan_space._varlen_calls())):
        for c in calls:
            try:
                v = planner(c).variant
            except U:
                continue
            t = v.tile
            if t.design != "fa4":
                continue
            assert v.head_dim_v <= v.head_dim, v.describe()
            assert fa4_smem_bytes(t, v.head_dim, v.head_dim_v) <= SM90_SMEM_BYTES, \
                v.describe()
