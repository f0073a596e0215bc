"""Diagnostic (not a test): confirms on the GPU what made the paged cp.async calls of
the issue "Correct or refused" crash or go wrong, by running its repros
(gpu_cases_fuzz.REPROS) with the tiles the planner chose before the fix (tile_n 144 /
112 / 80, not a whole number of the cp.async loader's row passes) and with today's.

    python tests/diag_cp_async_overrun.py --precompile DIR   # here: build the old tiles
    python tests/diag_cp_async_overrun.py [--only 0,1,2]     # GPU: one process per call

Each repro runs in its own process (an illegal address ends the process's CUDA context)
and prints ok / WRONG / CRASH for the old and the new tiles.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def use_old_tiles():
    """The planner as before the fix: no rounding of tile_n to loader passes."""
    import jax_fa4.dispatch as dispatch
    import jax_fa4.kernels.config as config

    dispatch.cp_async_tile = lambda tile, *dims: tile
    config.cp_async_rows_per_pass = lambda *dims: 16  # lets the variant guard pass


def run_one(index: int, old: bool) -> None:
    if old:
        use_old_tiles()
    import gpu_cases_fuzz
    import test_gpu_fuzz
    from jax_fa4.precompile import plan_call

    case = gpu_cases_fuzz.REPROS[index]
    tile = plan_call(case).variant.tile
    try:
        test_gpu_fuzz.test_fuzz_call(case)
        print(f"RESULT ok tile_n={tile.tile_n}")
    except AssertionError as e:
        print(f"RESULT WRONG tile_n={tile.tile_n}: {str(e).splitlines()[0][:120]}")
    except Exception as e:  # noqa: BLE001
        print(f"RESULT CRASH tile_n={tile.tile_n}: {type(e).__name__} {str(e)[:160]}")


def precompile(cache_dir: str) -> None:
    os.environ["JAX_FA4_CACHE_DIR"] = cache_dir
    use_old_tiles()
    import gpu_cases_fuzz
    from jax_fa4.precompile import plan_call

    from jax_fa4.kernels.cache import get_object

    for case in gpu_cases_fuzz.REPROS:
        v = plan_call(case).kernel_variant
        print(v.describe(), len(get_object(v)), flush=True)


def main(argv):
    if argv[:1] == ["--precompile"]:
        return precompile(argv[1])
    if argv[:1] == ["--one"]:
        return run_one(int(argv[1]), argv[2] == "old")
    import gpu_cases_fuzz

    only = argv[1].split(",") if argv[:1] == ["--only"] else None
    for i in range(len(gpu_cases_fuzz.REPROS)):
        if only is not None and str(i) not in only:
            continue
        for which in ("old", "new"):
            p = subprocess.run([sys.executable, __file__, "--one", str(i), which],
                               capture_output=True, text=True, timeout=300)
            res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
            out = res[0][7:] if res else f"CRASH (process rc={p.returncode}) " + \
                (p.stderr.strip().splitlines() or [""])[-1][:160]
            print(f"repro{i} {which}: {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
