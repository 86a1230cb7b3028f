"""PNG plots of simulator results and traces.

Uses matplotlib's object API with the Agg canvas (no pyplot), so importing or calling this module
changes no global matplotlib state and needs no display.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from haq.errors import HaqError
from haq.io import atomic_write_bytes
from haq.runtime.placement import expert_frequencies
from haq.runtime.trace import Trace
from haq.sim.timeline import SimResult


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def _by_budget(rows: Sequence[SimResult]) -> dict[int, list[SimResult]]:
    if not rows:
        raise HaqError("no simulation results to plot")
    groups: dict[int, list[SimResult]] = {}
    for r in rows:
        groups.setdefault(r.budget_bytes, []).append(r)
    return groups


def _panels(count: int, title: str) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.0 * count, 4.0))
    axes = [fig.add_subplot(1, count, i + 1) for i in range(count)]
    fig.suptitle(title)
    return fig, axes


def _rates_per_budget(rows: Sequence[SimResult], path: str | Path, title: str, xlabel: str, ylabel: str,
                      line, **style) -> Path:
    """One panel per budget, one line per policy: `line(result)` -> (x, y), y a rate in [0, 1]."""
    groups = _by_budget(rows)
    fig, axes = _panels(len(groups), title)
    for ax, (budget, group) in zip(axes, sorted(groups.items())):
        for r in group:
            ax.plot(*line(r), label=r.policy, **style)
        ax.set_title(f"budget {group[0].budget_frac:.0%} of experts ({budget / 2**30:.1f} GiB)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_hit_rate(rows: Sequence[SimResult], path: str | Path) -> Path:
    """Cumulative hit rate over decode tokens, one line per policy, one panel per budget."""
    return _rates_per_budget(rows, path, "device hit rate over tokens", "decode token", "cumulative hit rate",
                             lambda r: (np.arange(1, len(r.cum_hit_rate) + 1), r.cum_hit_rate))


def plot_layer_hit_rate(rows: Sequence[SimResult], path: str | Path) -> Path:
    """Device hit rate of each MoE layer, one line per policy, one panel per budget."""
    return _rates_per_budget(rows, path, "device hit rate per layer", "MoE layer", "hit rate",
                             lambda r: (np.arange(len(r.layer_hit_rate)), r.layer_hit_rate), marker=".")


def plot_tradeoff(curves: dict[str, Sequence[SimResult]], path: str | Path) -> Path:
    """Mean decode latency against the std over layers of the hit rate: one panel per budget, each
    named curve (e.g. haq over its pin shares) a line, every single point labelled by its policy."""
    budgets = sorted({r.budget_bytes for rs in curves.values() for r in rs})
    if not budgets:
        raise HaqError("no simulation results to plot")
    fig, axes = _panels(len(budgets), "per-layer hit-rate spread against mean decode latency")
    for ax, budget in zip(axes, budgets):
        for name, rs in curves.items():
            pts = [r for r in rs if r.budget_bytes == budget]
            single = len(pts) == 1
            ax.plot([r.layer_hit_std for r in pts], [r.latency_mean_s * 1e3 for r in pts], label=name,
                    marker="*" if single else "o", markersize=12 if single else 6, linestyle="none" if single else "-")
            for r in pts:
                if r.detail:
                    ax.annotate(r.detail, (r.layer_hit_std, r.latency_mean_s * 1e3), fontsize=7)
        frac = next(r.budget_frac for rs in curves.values() for r in rs if r.budget_bytes == budget)
        ax.set_title(f"budget {frac:.0%} of experts")
        ax.set_xlabel("std over layers of the hit rate")
        ax.set_ylabel("mean decode latency (ms/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_latency_cdf(rows: Sequence[SimResult], path: str | Path) -> Path:
    """Empirical CDF of per-token decode latency, one line per policy, one panel per budget."""
    groups = _by_budget(rows)
    fig, axes = _panels(len(groups), "per-token decode latency")
    for ax, (budget, group) in zip(axes, sorted(groups.items())):
        for r in group:
            lat = np.sort(r.latency_s) * 1e3
            ax.step(lat, np.arange(1, len(lat) + 1) / max(len(lat), 1), where="post", label=r.policy)
        ax.set_title(f"budget {group[0].budget_frac:.0%} of experts ({budget / 2**30:.1f} GiB)")
        ax.set_xlabel("latency per token (ms)")
        ax.set_ylabel("fraction of tokens")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a log axis
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_expert_heatmap(trace: Trace, path: str | Path) -> Path:
    """Share of each layer's expert calls per expert (layers x experts)."""
    freq = expert_frequencies(trace)  # [L, E]
    share = freq / np.maximum(freq.sum(axis=1, keepdims=True), 1)
    L, E = share.shape
    fig = Figure(figsize=(max(4.0, 0.35 * E + 2.0), max(4.0, 0.2 * L + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of the layer's calls")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{trace.meta.model}: expert frequency ({trace.num_tokens} tokens)")
    return _save(fig, path)


def plot_engine_run(metrics, folder: str | Path) -> list[Path]:
    """`haq run --plot`: cumulative hit rate over decode tokens and the per-token latency CDF."""
    folder = Path(folder)
    fig, (ax_hit, ax_lat) = _panels(2, f"engine run: policy {metrics.policy}, "
                                       f"budget {metrics.budget_bytes / max(metrics.total_expert_bytes, 1):.0%} of experts")
    ax_hit.plot(np.arange(1, len(metrics.cum_hit_rate) + 1), metrics.cum_hit_rate)
    ax_hit.set_xlabel("decode token")
    ax_hit.set_ylabel("cumulative hit rate")
    ax_hit.set_ylim(0.0, 1.0)
    ax_hit.grid(alpha=0.3)
    lat = np.sort(np.asarray(metrics.token_latency_ms))
    ax_lat.step(lat, np.arange(1, len(lat) + 1) / max(len(lat), 1), where="post")
    ax_lat.set_xlabel("latency per token (ms)")
    ax_lat.set_ylabel("fraction of tokens")
    ax_lat.grid(alpha=0.3)
    return [_save(fig, folder / "run.png")]
