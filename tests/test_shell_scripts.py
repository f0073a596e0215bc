"""The repository's shell scripts (CI, the device runner, precompile): valid bash, and no
comment line inside a backslash-continued command.

The second is not a style rule.  In

    XLA_FLAGS="... --xla_gpu_autotune_level=0" \\
    # a comment
    timeout ... python3 tests/gpu_shards.py

the backslash joins the comment to the assignment, the comment ends that command, and
the assignment becomes a plain shell variable the next line never sees: tests/gpu_run.sh
ran the GPU tests with XLA's GEMM autotuning on (seconds per reference shape) from
2026-12-07 until this test found it.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scripts():
    out = []
    for d in (".ci", "tests", "benchmarks", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    head = fh.readline()
                if f.endswith(".sh") or (head.startswith(b"#!") and b"sh" in head
                                         and b"python" not in head):
                    out.append(path)
    return sorted(out)


SCRIPTS = _scripts()


def test_scripts_found():
    names = {os.path.relpath(p, ROOT) for p in SCRIPTS}
    assert {".ci/run", "tests/gpu_run.sh", "tests/device_call.sh",
            "tests/precompile_device.sh"} <= names


def comment_inside_continuation(text: str) -> list[int]:
    """1-based numbers of comment-only lines that follow a line ending in a backslash."""
    lines = text.splitlines()
    return [i + 2 for i, (a, b) in enumerate(zip(lines, lines[1:]))
            if a.rstrip().endswith("\\") and not a.rstrip().endswith("\\\\")
            and b.lstrip().startswith("#")]


def test_the_check_finds_the_bug():
    bad = 'X=1 \\\n  # why\n  run\n'
    assert comment_inside_continuation(bad) == [2]
    assert comment_inside_continuation('# why\nX=1 \\\n  run\n') == []


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_no_comment_inside_a_continued_command(path):
    with open(path) as f:
        bad = comment_inside_continuation(f.read())
    assert not bad, f"{os.path.relpath(path, ROOT)}: comment line(s) {bad} end a continued command"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_bash_syntax(path):
    r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_tests_step_passes_xla_flags(tmp_path):
    """The tests step's python3 sees --xla_gpu_autotune_level=0 (a stub python3 on PATH
    prints its environment; the install, runtime and nvidia-smi steps are stubbed)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    log = tmp_path / "seen"
    (stub / "python3").write_text(
        "#!/usr/bin/env bash\n"
        f'case "$*" in *gpu_shards.py*) echo "XLA_FLAGS=$XLA_FLAGS" >> {log} ;;'
        ' *unpack-runtime*) echo /nonexistent/libcute_dsl_runtime.so ;;'
        f' *jax_fa4._ffi*) echo {ROOT}/jax_fa4 ;; esac\n')
    (stub / "nvidia-smi").write_text("#!/usr/bin/env bash\necho stub\n")
    for f in stub.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}",
               OUT=str(tmp_path / "out"), TEST_TIMEOUT="60")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "tests", "gpu_run.sh"), "tests"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    seen = log.read_text() if log.exists() else ""
    assert "--xla_gpu_autotune_level=0" in seen, (seen, r.stdout[-2000:], r.stderr[-2000:])
