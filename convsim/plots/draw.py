"""Matplotlib drawings: each function takes plain numbers and returns a `matplotlib.figure.Figure`.

No pyplot (no global state, no display needed); `save_png` writes a figure atomically. Speakers keep
one colour across every figure (`colour(i)`: the i-th speaker of the run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from convsim.fsutil import atomic_path

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
DPI = 110


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")


def _plain_log_y(ax) -> None:
    """Log y with ticks written 1, 10, 0.01 (not 10^1) and labelled minor ticks only where few majors."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    if hi / max(lo, 1e-12) < 100:  # under two decades: label 2x, 5x too
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(plain)


def heatmap(matrix: np.ndarray, words: Sequence[str], title: str, diverging: bool) -> Figure:
    """A word × word matrix with every word on both axes.

    Similarities use a sequential map over the off-diagonal range (final-layer cosines sit around
    0.7-0.9, which a scale centred at zero would paint one colour); differences use coolwarm centred at
    zero with symmetric limits, so red is "more similar than in the reference" and blue "less".
    """
    n = len(words)
    side = max(6.0, 0.24 * n + 3.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    off = matrix[~np.eye(n, dtype=bool)] if n > 1 else matrix.ravel()
    if diverging:
        lim = float(np.abs(off).max()) or 1e-6
        im = ax.imshow(matrix, cmap="coolwarm", norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim))
        label = "difference in cosine similarity"
    else:
        im = ax.imshow(matrix, cmap="viridis", vmin=float(off.min()), vmax=float(off.max()))
        label = "cosine similarity (diagonal = 1, off the scale)"
    fs = 9 if n > 30 else 11
    ax.set_xticks(range(n), labels=words, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), labels=words, fontsize=fs)
    ax.tick_params(top=True, labeltop=True, bottom=True, labelbottom=True)
    ax.set_title(title, fontsize=13, pad=12)
    cbar = fig.colorbar(im, ax=ax, shrink=0.7, pad=0.02)
    cbar.set_label(label, fontsize=11)
    return fig


def length_histograms(
    chars: dict[str, list[int]], tokens: dict[str, list[int]], speakers: Sequence[str], clip: float = 99.5
) -> Figure:
    """Characters and tokens per message, one step histogram per speaker, log y. Messages past the
    `clip` percentile of everyone's lengths are counted in the last bin, so one huge paste doesn't
    squash the rest."""
    fig = Figure(figsize=(13, 5))
    for k, (data, what) in enumerate([(chars, "characters"), (tokens, "tokens")]):
        ax = fig.add_subplot(1, 2, k + 1)
        every = np.concatenate([np.asarray(data[s], dtype=float) for s in speakers if data.get(s)])
        top = max(1.0, float(np.percentile(every, clip)))
        bins = np.linspace(0, top, 51) if top > 50 else np.arange(0, top + 2) - 0.5
        for i, s in enumerate(speakers):
            if data.get(s):
                ax.hist(
                    np.clip(data[s], 0, top),
                    bins=bins,
                    histtype="step",
                    linewidth=1.8,
                    color=colour(i),
                    label=f"{s} (n={len(data[s]):,}, median {np.median(data[s]):g})",
                )
        _plain_log_y(ax)
        ax.set_xlabel(f"{what} per message (last bin: ≥ {top:g})", fontsize=11)
        ax.set_ylabel("messages (log scale)", fontsize=11)
        ax.set_title(f"Message length in {what}", fontsize=12)
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(curves: dict[str, list[tuple[int, float]]]) -> Figure:
    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    if curves["train"]:
        x, y = zip(*curves["train"])
        ax.plot(x, y, color="#1f77b4", linewidth=1.6, label="train loss", marker="." if len(x) < 40 else None)
    if curves["val"]:
        x, y = zip(*curves["val"])
        ax.plot(x, y, color="#d62728", linewidth=2.0, marker="o", markersize=4, label="validation loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step", fontsize=11)
    ax.set_ylabel("cross-entropy (nats per token)", fontsize=11)
    ax.set_title("Training and validation loss", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def burst_sizes(sizes: dict[str, list[int]], speakers: Sequence[str], cap: int = 10) -> Figure:
    """Share of each speaker's bursts by size (1, 2, ..., `cap`+), grouped bars, log y."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    xs = np.arange(1, cap + 1)
    width = 0.8 / max(1, len(speakers))
    for i, s in enumerate(speakers):
        v = np.minimum(np.asarray(sizes.get(s, []), dtype=int), cap)
        if not len(v):
            continue
        share = np.array([(v == x).mean() for x in xs])
        ax.bar(
            xs + (i - (len(speakers) - 1) / 2) * width,
            np.where(share > 0, share, np.nan),
            width,
            color=colour(i),
            label=f"{s} ({len(v):,} bursts, mean {np.mean(sizes[s]):.2f})",
        )
    ax.set_xticks(xs, labels=[str(x) for x in xs[:-1]] + [f"{cap}+"])
    _plain_log_y(ax)
    ax.set_xlabel("messages in a row (burst size)", fontsize=11)
    ax.set_ylabel("share of the speaker's bursts (log scale)", fontsize=11)
    ax.set_title("Burst size: how many messages each person sends in a row", fontsize=12)
    ax.legend(fontsize=9, loc="upper right")  # the tall bars are on the left
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


TIME_TICKS = [
    (1, "1 s"),
    (10, "10 s"),
    (60, "1 min"),
    (600, "10 min"),
    (3600, "1 h"),
    (6 * 3600, "6 h"),
    (86400, "1 day"),
    (7 * 86400, "1 week"),
    (30 * 86400, "30 days"),
]


def reply_delays(delays: dict[str, list[float]], speakers: Sequence[str]) -> Figure:
    """Reply delay per speaker on a log time axis (delays under a second counted as one second)."""
    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot()
    every = np.concatenate([np.asarray(delays[s], dtype=float) for s in speakers if delays.get(s)])
    top = max(10.0, float(every.max()))
    bins = np.logspace(0, np.log10(top) + 1e-9, 50)
    for i, s in enumerate(speakers):
        d = np.asarray(delays.get(s, []), dtype=float)
        if len(d):
            ax.hist(
                np.clip(d, 1, None),
                bins=bins,
                histtype="step",
                linewidth=1.8,
                color=colour(i),
                label=f"{s} (n={len(d):,}, median {_human(float(np.median(d)))})",
            )
    ax.set_xscale("log")
    ticks = [(t, lab) for t, lab in TIME_TICKS if t <= top * 1.5]
    ax.set_xticks([t for t, _ in ticks], labels=[lab for _, lab in ticks])
    ax.set_xlabel("time from the other person's last message to the reply (log scale)", fontsize=11)
    ax.set_ylabel("replies", fontsize=11)
    ax.set_title("Reply delay", fontsize=12)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _human(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def pca_scatter(
    coords: np.ndarray, labels: Sequence[str], speakers: Sequence[str], explained: Sequence[float]
) -> Figure:
    fig = Figure(figsize=(9, 8))
    ax = fig.add_subplot()
    labels = np.asarray(labels)
    for i, s in enumerate(speakers):
        pts = coords[labels == s]
        if len(pts):
            ax.scatter(
                pts[:, 0], pts[:, 1], s=12, alpha=0.6, color=colour(i), edgecolors="none", label=f"{s} ({len(pts):,})"
            )
    ax.set_xlabel(f"PC 1 ({explained[0]:.1%} of variance)", fontsize=11)
    ax.set_ylabel(f"PC 2 ({explained[1]:.1%} of variance)", fontsize=11)
    ax.set_title("Message activations of the fine-tuned model (final layer, mean over tokens), PCA", fontsize=12)
    ax.legend(fontsize=10, markerscale=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
