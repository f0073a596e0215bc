"""Plots bench_forward.py's JSON: TFLOP/s vs sequence length per backend."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, out):
    data = json.load(open(path))
    rows = [r for r in data["results"] if not r.get("headline")]
    panels = sorted({(r["d"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels) // 2, figsize=(4.2 * len(panels) // 2, 7),
                             sharey=True, squeeze=False)
    for ax, (d, causal) in zip(axes.T.flat, panels):
        sel = sorted((r for r in rows if r["d"] == d and r["causal"] == causal),
                     key=lambda r: r["s"])
        for name in sel[0]["tflops"]:
            pts = [(r["s"], r["tflops"][name]) for r in sel if r["tflops"].get(name)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"hdim {d}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length (batch x seq = 32k tokens)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("TFLOP/s")
    axes[1, 0].set_ylabel("TFLOP/s")
    axes[0, 0].legend()
    fig.suptitle(f"Forward attention, {data['device']}, bf16, {data['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
