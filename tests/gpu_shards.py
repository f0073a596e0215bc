"""Runs the GPU tests in shards, one pytest process each, so that a CUDA illegal address
(which kills the process's CUDA context: every later call in it fails) is reported with
the case that caused it and spares the rest (tests/gpu_run.sh calls this).

    python tests/gpu_shards.py [--jobs 3] [--shard-size 60] [--out DIR] [pytest selection...]

Collects the `gpu`-marked tests, cuts them into shards (by file, at most --shard-size
tests each) and runs --jobs shards at a time (each process takes a share of GPU
memory).  Each process loads this module as a pytest plugin: it logs every test's start
and outcome to a file, and when a failure's text shows a CUDA context error it records
the test as CRASHED and ends the process at once.  The driver then starts a new process
for the shard's remaining tests.  Writes DIR/shards.log (every line of every process)
and DIR/gpu_summary.json (counts, failures, crashes); exit status 1 if anything failed
or crashed.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CRASH_MARKERS = ("ILLEGAL_ADDRESS", "illegal memory access", "CUDA_ERROR_LAUNCH_FAILED",
                 "unspecified launch failure", "misaligned address",
                 "CUDA_ERROR_ILLEGAL_INSTRUCTION", "device-side assert")


# --------------------------------------------------------------------------- plugin side

_LOG = os.environ.get("JAX_FA4_SHARD_LOG")


def _write(line: str) -> None:
    with open(_LOG, "a") as f:
        f.write(line + "\n")


_T0 = time.time()  # this process's start (the plugin loads with pytest)
_FIRST = True


def pytest_runtest_logstart(nodeid, location):
    global _FIRST
    if _LOG:
        if _FIRST:  # startup: imports, collection, the GPU client
            _write(f"TIME {time.time() - _T0:.1f}s startup")
            _FIRST = False
        _write(f"START {nodeid}")


def pytest_runtest_logreport(report):
    if not _LOG:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome.upper()
        text = str(report.longrepr or "")
        if report.failed and any(m in text for m in CRASH_MARKERS):
            _write(f"CRASHED {report.nodeid}")
            _write("DETAIL " + text[-2000:].replace("\n", "\n DETAIL "))
            sys.stdout.flush()
            os._exit(3)  # the CUDA context is gone: every later test here would fail
        _write(f"{outcome} {report.nodeid}")
        _write(f"TIME {report.duration:.1f}s {report.nodeid}")  # where a shard's time goes
        if report.failed:
            _write("DETAIL " + text[-1500:].replace("\n", "\n DETAIL "))


# --------------------------------------------------------------------------- driver side

def _collect(selection: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          *selection], capture_output=True, text=True, cwd=os.path.dirname(HERE))
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    if not ids:
        print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
    return ids


def _shards(ids: list[str], size: int) -> list[list[str]]:
    by_file = collections.defaultdict(list)
    for i in ids:
        by_file[i.split("::")[0]].append(i)
    return [tests[k:k + size] for tests in by_file.values() for k in range(0, len(tests), size)]


def _run_shard(index: int, tests: list[str], mem_fraction: float, deadline: float) -> dict:
    """Runs `tests` in as many processes as crashes need, until `deadline` (time.time());
    returns outcomes (tests not reached: NOT_RUN; the one running at the deadline:
    TIMEOUT)."""
    outcomes, todo, rounds = {}, list(tests), 0
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{mem_fraction:.2f}",
               PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    transcript = []
    while todo:
        rounds += 1
        fd, log = tempfile.mkstemp(prefix=f"shard{index}_", suffix=".log")
        os.close(fd)
        env["JAX_FA4_SHARD_LOG"] = log
        t0 = time.time()
        if t0 >= deadline:
            outcomes.update({t: "NOT_RUN" for t in todo})
            break
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_shards",
                                   "-p", "no:cacheprovider", "-m", "gpu", *todo],
                                  capture_output=True, text=True, env=env,
                                  cwd=os.path.dirname(HERE), timeout=deadline - t0)
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(e.cmd, "timeout", e.stdout or "", e.stderr or "")
            proc.stdout = proc.stdout if isinstance(proc.stdout, str) else proc.stdout.decode()
            proc.stderr = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
        lines = open(log).read().splitlines()
        os.unlink(log)
        transcript += [f"[shard {index}.{rounds} rc={proc.returncode} {time.time() - t0:.0f}s]"]
        transcript += lines
        started = None
        for ln in lines:
            kind, _, nodeid = ln.partition(" ")
            if kind == "START":
                started = nodeid
            elif kind in ("PASSED", "FAILED", "SKIPPED", "ERROR", "CRASHED"):
                outcomes[nodeid] = kind
                started = None if kind != "CRASHED" else started
        if started is not None and started not in outcomes:  # died without a report
            outcomes[started] = "TIMEOUT" if proc.returncode == "timeout" else "CRASHED"
            transcript.append(f"{outcomes[started]} {started} (rc={proc.returncode})")
        rest = [t for t in todo if t not in outcomes]
        if rest and len(rest) == len(todo):  # nothing ran: give up on these
            transcript.append(proc.stdout[-3000:] + proc.stderr[-3000:])
            for t in rest:
                outcomes[t] = "NOT_RUN"
            rest = []
        todo = rest
    return {"outcomes": outcomes, "transcript": transcript}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=int(os.environ.get("GPU_TEST_JOBS", 3)))
    p.add_argument("--shard-size", type=int, default=60)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/jax_fa4_out"))
    p.add_argument("--deadline", type=float, default=float(os.environ.get(
        "GPU_TEST_DEADLINE", 86400)), help="seconds; later tests are reported NOT_RUN")
    p.add_argument("-k", dest="keyword", help="pytest -k expression for the collection")
    p.add_argument("selection", nargs="*", default=["tests"])
    args = p.parse_args(argv)
    if args.keyword:
        args.selection = ["-k", args.keyword, *args.selection]
    os.makedirs(args.out, exist_ok=True)
    ids = _collect(args.selection)
    shards = _shards(ids, args.shard_size)
    print(f"gpu_shards: {len(ids)} tests in {len(shards)} shards, {args.jobs} at a time",
          flush=True)
    t0, results = time.time(), {}
    deadline = t0 + args.deadline
    frac = min(0.9 / max(1, args.jobs), 0.75)
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = {pool.submit(_run_shard, i, s, frac, deadline): i for i, s in enumerate(shards)}
        for fut in cf.as_completed(futs):
            r = fut.result()
            results[futs[fut]] = r
            c = collections.Counter(r["outcomes"].values())
            print(f"  shard {futs[fut]} ({shards[futs[fut]][0].split('::')[0]}): {dict(c)} "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    outcomes = {k: v for r in results.values() for k, v in r["outcomes"].items()}
    with open(os.path.join(args.out, "shards.log"), "w") as f:
        for i in sorted(results):
            f.write("\n".join(results[i]["transcript"]) + "\n")
    counts = collections.Counter(outcomes.values())
    bad = {k: v for k, v in outcomes.items()
           if v in ("FAILED", "ERROR", "CRASHED", "NOT_RUN", "TIMEOUT")}
    summary = {"tests": len(ids), "counts": dict(counts), "bad": bad,
               "seconds": round(time.time() - t0)}
    with open(os.path.join(args.out, "gpu_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"gpu_shards: {dict(counts)} in {summary['seconds']}s", flush=True)
    for k, v in sorted(bad.items()):
        print(f"  {v} {k}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
