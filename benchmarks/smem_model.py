"""Shared-memory traffic of the SM90 forward designs, per K/V block, and the tensor-core
share it allows: why head dim 512 stays below FA4's hdim-128/256 throughput.

  python benchmarks/smem_model.py            # the table docs/PERF.md quotes

An H100 SM moves 128 bytes per clock through shared memory (the 33 TB/s of the data
sheet: 132 SMs x 128 B x 1.98 GHz) and its tensor cores do 2048 bf16 multiply-adds per
clock (989 dense TFLOP/s = 132 x 4096 FLOP x 1.83 GHz).  Every byte below crosses the
shared-memory banks once per K/V block (bf16, 2 bytes an element):

- TMA writes the K and V tiles: n x (d + dv) x 2.
- An SS WGMMA reads both operands from shared memory, once per instruction: a QK^T of
  an m x n tile over head dim d reads the Q rows and all of K, per warpgroup that
  issues it.  An RS WGMMA (P in registers) reads only its B operand (V).
- P through shared memory: written once, read by every warpgroup that multiplies it.
- split_k's S exchange: each of two warpgroups writes its m x n float32 partial and
  reads the other's.

MACs are the useful (counted) work: m x n x (d + dv); split_pv's duplicated QK^T and
the causal diagonal's masked half are extra tensor work the bound ignores.  The model
leaves out what is small beside these (row statistics, the epilogue's O staging: once
per tile, not per block).
"""
from __future__ import annotations

import argparse
import dataclasses

SMEM_BYTES_PER_CLK = 128  # per SM, H100 / H200 (the same SM)
MACS_PER_CLK = 2048  # bf16 dense, per SM
PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16


@dataclasses.dataclass(frozen=True)
class Design:
    name: str
    m: int  # query rows per tile
    n: int  # keys per K/V block
    d: int
    dv: int
    mma_wgs: int = 2  # MMA warpgroups


def block_bytes(x: Design) -> dict[str, int]:
    """Shared-memory bytes per K/V block, by what moves them."""
    e = 2  # bf16
    tma = x.n * (x.d + x.dv) * e
    k, v, q = x.n * x.d * e, x.n * x.dv * e, x.m * x.d * e
    p = x.m * x.n * e
    if x.name == "fa4":  # each warpgroup: its 64 Q rows and all of K (SS), all of V (RS)
        return dict(tma=tma, qk=q + x.mma_wgs * k, pv=x.mma_wgs * v)
    if x.name == "split_k":  # each warpgroup: half of Q and K, half of V; fp32 exchange
        return dict(tma=tma, qk=q + k, exchange=2 * 2 * x.m * x.n * 4, pv=v)
    if x.name == "split_pv":  # both compute the whole S; each its own P; half of V each
        return dict(tma=tma, qk=2 * (q + k), p=2 * 2 * p, pv=v)
    if x.name == "single_qk":  # warpgroup 0's S; P written once, read by both
        return dict(tma=tma, qk=q + k, p=3 * p, pv=v)
    raise ValueError(f"unknown design {x.name!r}")


def bound(x: Design) -> dict:
    """bytes per MAC, the shared-memory bytes per clock full tensor speed would need,
    and the share of tensor peak (and TFLOP/s) the 128 B/clock allow."""
    parts = block_bytes(x)
    macs = x.m * x.n * (x.d + x.dv)
    per_mac = sum(parts.values()) / macs
    need = per_mac * MACS_PER_CLK
    share = min(1.0, SMEM_BYTES_PER_CLK / need)
    return dict(design=x.name, tile=f"{x.m}x{x.n}", head_dim=x.d, bytes=parts,
                bytes_per_mac=round(per_mac, 5), bytes_per_clk=round(need, 1),
                share=round(share, 3), tflops=round(share * PEAK_TFLOPS))


# The kernels as jax_fa4 runs them (kernels/config.py tiles; hdim 512: hdim512_tile).
DESIGNS = [Design("fa4", 128, 128, 128, 128), Design("fa4", 128, 80, 256, 256),
           Design("split_k", 64, 64, 512, 512), Design("single_qk", 64, 64, 512, 512),
           Design("split_pv", 64, 64, 512, 512)]


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    print("| design | head dim | tile | smem bytes / block (KiB) | B / MAC | B / clk at peak "
          "| ceiling (share of peak, TFLOP/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for x in DESIGNS:
        b = bound(x)
        parts = ", ".join(f"{k} {v / 1024:g}" for k, v in b["bytes"].items())
        print(f"| {b['design']} | {b['head_dim']} | {b['tile']} | {parts} | "
              f"{b['bytes_per_mac']:.4f} | {b['bytes_per_clk']} | "
              f"{b['share']:.0%}, {b['tflops']} |")


if __name__ == "__main__":
    main()
