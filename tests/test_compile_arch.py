"""Compiling a kernel targets sm_90a but leaves CUTE_DSL_ARCH as the process had it:
unset stays unset (the kernel modules' import-time `setdefault` must not leak), a value
stays that value, and the CuTe DSL's own arch (read once, at `import cutlass`) is put
back too (None: detected lazily, as if never pinned).  Each case runs in a fresh process, since the DSL keeps its arch per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import has_compiler

pytestmark = [pytest.mark.compile,
              pytest.mark.skipif(not has_compiler(), reason="needs jax_fa4[compile]")]

CHILD = textwrap.dedent("""
    import json, os, re, sys
    if sys.argv[1] == "cutlass-first":  # the user's cutlass, built without our arch
        import cutlass  # noqa: F401
    from jax_fa4.kernels import ForwardVariant, get_object
    obj = get_object(ForwardVariant("bfloat16", 64, 64, 1))
    from cutlass.base_dsl.dsl import DSLSingletonMeta
    print(json.dumps({
        "env": os.environ.get("CUTE_DSL_ARCH"),
        # each DSL singleton's arch, against what its own variable says now
        "dsl": [[d.envar._arch, os.environ.get(d.envar.prefix + "_ARCH")]
                for d in DSLSingletonMeta._instances.values()],
        "targets": sorted({m.decode() for m in re.findall(rb"sm_[0-9]+a?", obj)})}))
""")


# (CUTE_DSL_ARCH at start or None, import cutlass before jax_fa4 compiles?)
CASES = [(None, False), ("sm_100a", True)]


def test_compile_leaves_cute_dsl_arch_as_found(tmp_path):
    procs = []
    for i, (arch, cutlass_first) in enumerate(CASES):  # both at once: one core each
        env = {k: v for k, v in os.environ.items() if k != "CUTE_DSL_ARCH"}
        env.update(JAX_FA4_CACHE_DIR=str(tmp_path / str(i)), JAX_FA4_COMPILE="auto",
                   JAX_FA4_QUIET="1", JAX_PLATFORMS="cpu")
        if arch is not None:
            env["CUTE_DSL_ARCH"] = arch
        procs.append(subprocess.Popen(
            [sys.executable, "-c", CHILD, "cutlass-first" if cutlass_first else "-"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for (arch, _), p in zip(CASES, procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["env"] == arch
        assert got["dsl"] and all(a == b for a, b in got["dsl"])  # as if never pinned
        assert got["targets"] == ["sm_90a"]
