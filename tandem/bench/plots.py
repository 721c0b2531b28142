"""PNG plots for `tandem bench serve --plot` and `tandem bench sweep --plot` (matplotlib,
drawn off-screen)."""
from __future__ import annotations

import numpy as np

from tandem.bench.metrics import RequestResult, throughput_over_time


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plot: needs matplotlib (pip install 'tandem[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: list[float], title: str) -> None:
    if values_ms:
        xs = np.sort(values_ms)
        ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if "ITL" not in title else "fraction of gaps")
    ax.grid(alpha=0.3)


def plot_run(results: list[RequestResult], path: str, title: str) -> None:
    plt = _pyplot()
    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    _cdf(axes[0][0], [r.ttft * 1e3 for r in ok], "TTFT CDF")
    _cdf(axes[0][1], [g * 1e3 for r in ok for g in r.itl], "ITL CDF")
    _cdf(axes[1][0], [r.latency * 1e3 for r in ok], "End-to-end latency CDF")
    t, tput = throughput_over_time(results)
    ax = axes[1][1]
    ax.plot(t, tput)
    ax.set_title("Output throughput over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(points: list[dict], path: str, title: str) -> None:
    """Output throughput against p99 TTFT and p99 ITL, one point per load level."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "p99_ttft_ms", "p99 TTFT (ms)"),
                          (axes[1], "p99_itl_ms", "p99 ITL (ms)")):
        xs = [p["output_throughput"] for p in points]
        ax.plot(xs, [p[key] for p in points], marker="o")
        for p, x in zip(points, xs):
            ax.annotate(p["label"], (x, p[key]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
