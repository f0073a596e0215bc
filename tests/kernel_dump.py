"""CuTe DSL's dumps of one compiled kernel, for tests that read its PTX or MLIR: the
variant compiles in a fresh process (the DSL dumps only when it compiles, and reads
CUTE_DSL_KEEP_* at import) through jax_fa4's own compile path."""
import os
import subprocess
import sys
import textwrap

_CODE = """
    import sys
    from jax_fa4.kernels import compile as kc
    v = kc.variant_from_spec(sys.argv[1])
    with kc.target_sm90():
        kc._compiler_for(v)(v)
"""


def kernel_dumps(tmp_path, variant, what: str = "PTX") -> list[str]:
    """The texts of the dump files (what: "PTX", or "IR" for the MLIR) that compiling
    `variant` writes, one per file, into a fresh folder under tmp_path."""
    from jax_fa4.kernels.compile import variant_spec

    out = tmp_path / f"dump_{variant.symbol}_{what}"
    out.mkdir()
    env = dict(os.environ, CUTE_DSL_DUMP_DIR=str(out), **{f"CUTE_DSL_KEEP_{what}": "1"})
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_CODE), variant_spec(variant)],
                       env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stderr[-2000:]
    return [p.read_text() for p in sorted(out.glob("*.ptx" if what == "PTX" else "*.mlir"))]
