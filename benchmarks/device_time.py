"""GPU time of a jitted program from a JAX profiler trace (no host time in it).

`device_time(f, *args)` runs f once under `jax.profiler.trace` and reads the GPU's
kernel events from the trace (jax.profiler.ProfileData, no TensorBoard needed): the span
from the first kernel's start to the last one's end, and the summed kernel durations.
A chain of R dependent calls in one program divides both by R and gives the per-call
device time, launch gaps between its kernels included but not the host's dispatch.
"""
from __future__ import annotations

import glob
import tempfile

import jax


def kernel_events(f, *args):
    """[(name, start_ns, duration_ns)] of the GPU kernels of one run of f(*args) (warm),
    in start order; [] without GPU kernel events (e.g. on CPU)."""
    jax.block_until_ready(f(*args))  # compiled and warm
    d = tempfile.mkdtemp(prefix="jax_fa4_trace_")
    with jax.profiler.trace(d):
        jax.block_until_ready(f(*args))
    paths = sorted(glob.glob(d + "/**/*.xplane.pb", recursive=True))
    events = []
    for plane in (jax.profiler.ProfileData.from_file(paths[-1]).planes if paths else ()):
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if "stream" in line.name.lower():
                    events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return sorted(events, key=lambda e: e[1])


def device_time(f, *args):
    """(span_s, busy_s, kernels) of one run of f(*args), or None if the trace has no GPU
    kernel events (e.g. on CPU)."""
    events = kernel_events(f, *args)
    if not events:
        return None
    start = min(s for _, s, _ in events)
    end = max(s + d for _, s, d in events)
    return (end - start) * 1e-9, sum(d for _, _, d in events) * 1e-9, len(events)


def chain(step, calls):
    """A jitted program running x = step(i, x, *args) for i < calls: each call's output
    is the next one's input, so XLA can neither merge nor reorder the calls."""
    @jax.jit
    def program(x, *args):
        for i in range(calls):
            x = step(i, x, *args)
        return x
    return program


def per_call(program, calls, *args):
    """GPU seconds per call of a `chain(step, calls)` program, None without a GPU trace:
    its span / calls counts the launch gaps between the calls' kernels, not the host's
    dispatch or the final sync."""
    dev = device_time(program, *args)
    return dev[0] / calls if dev else None
