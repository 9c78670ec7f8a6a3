"""Draw the figures of `docs/benchmarks.md` from the tables on that page.

The tables hold the numbers measured by `benchmarks/*.py` (see the page for each command); this script
reads them back, so a figure can never disagree with its table. Run it after updating a table:

    python docs/assets/benchmarks/make_plots.py            # writes the PNGs beside this script
    python docs/assets/benchmarks/make_plots.py --out DIR
"""

from __future__ import annotations

import argparse
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

HERE = pathlib.Path(__file__).resolve().parent
PAGE = HERE.parent.parent / "benchmarks.md"
NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?:\s*[–-]\s*(\d+(?:\.\d+)?))?")


def section_tables(text: str, heading: str) -> list[list[list[str]]]:
    """The Markdown tables under `## heading` (rows of cells, header and rule dropped)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    if match is None:
        raise ValueError(f"{PAGE.name}: no section '## {heading}'")
    tables, rows = [], []
    for line in match.group(1).splitlines() + [""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            tables.append([r for r in rows[1:] if not set("".join(r)) <= set("-: ")])
            rows = []
    if not tables:
        raise ValueError(f"{PAGE.name}: no table under '## {heading}'")
    return tables


def value_range(cell: str) -> tuple[float, float]:
    """`"1.80–1.83"` → (1.80, 1.83); `"0.43"` → (0.43, 0.43); units and `×` are ignored."""
    match = NUMBER.search(cell)
    if match is None:
        raise ValueError(f"no number in table cell {cell!r}")
    low = float(match.group(1))
    return low, float(match.group(2)) if match.group(2) else low


def bars_with_ranges(ax, positions, ranges, width, label, color) -> None:
    mids = [(lo + hi) / 2 for lo, hi in ranges]
    errors = [[m - lo for m, (lo, _) in zip(mids, ranges)], [hi - m for m, (_, hi) in zip(mids, ranges)]]
    ax.bar(positions, mids, width, yerr=errors, capsize=3, label=label, color=color)


def plot_solvers(text: str, out: pathlib.Path) -> pathlib.Path:
    (table,) = section_tables(text, "Solvers against torchdeq")
    cell, rows = "", []
    for row in table:
        cell = row[0] or cell
        rows.append((cell.split(",")[0], row[1], value_range(row[-1])))
    solvers = ["fixed point", "Anderson", "Broyden"]
    cells = list(dict.fromkeys(c for c, _, _ in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.4), sharey=True)
    for ax, name in zip(axes, cells):
        ours = {s: r for c, s, r in rows if c == name}
        x = range(len(solvers))
        bars_with_ranges(ax, [i - 0.2 for i in x], [ours[s] for s in solvers], 0.4, "implicitlayers", "tab:blue")
        floors = [ours.get(f"{s} floor") for s in solvers]
        bars_with_ranges(
            ax, [i + 0.2 for i, f in zip(x, floors) if f], [f for f in floors if f], 0.4, "bare-loop floor", "tab:gray"
        )
        ax.axhline(1.0, color="tab:red", lw=1, ls="--", label="torchdeq")
        ax.set_xticks(list(x), solvers)
        ax.set_title(f"{name} cell")
    axes[0].set_ylabel("time ÷ torchdeq (lower is faster)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Forward solvers, same tolerance, same run", fontsize=11)
    fig.tight_layout()
    return save(fig, out / "solvers.png")


def plot_backward_memory(text: str, out: pathlib.Path) -> pathlib.Path:
    (table,) = section_tables(text, "Implicit backward: time and memory")
    iters = [int(r[0]) for r in table]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(iters, [value_range(r[1])[0] for r in table], "o-", label="IFT (implicitlayers)")
    ax.plot(iters, [value_range(r[2])[0] for r in table], "s-", label="Unroll (backprop through iterations)")
    ax.set_xlabel("forward iterations (max_iter)")
    ax.set_ylabel("memory saved for backward (MiB)")
    ax.set_title("Training-step memory vs forward iterations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "backward_memory.png")


def plot_jiio(text: str, out: pathlib.Path) -> pathlib.Path:
    (table,) = section_tables(text, "JIIO against the nested loop")
    labels = [f"{r[0]}\nvs {r[1]}" for r in table]
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    y = range(len(table))
    time_ranges = [value_range(r[2]) for r in table]
    ax.barh([i + 0.2 for i in y], [value_range(r[3])[0] for r in table], 0.4, label="evaluation ratio", color="tab:gray")
    mids = [(lo + hi) / 2 for lo, hi in time_ranges]
    ax.barh([i - 0.2 for i in y], mids, 0.4, xerr=[[m - lo for m, (lo, _) in zip(mids, time_ranges)],
                                                    [hi - m for m, (_, hi) in zip(mids, time_ranges)]],
            capsize=3, label="wall-time ratio (3 runs)", color="tab:blue")
    ax.axvline(1.0, color="tab:red", lw=1, ls="--")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("naive loop ÷ JIIO, to the same objective (higher: JIIO faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out / "jiio.png")


def plot_meta(text: str, out: pathlib.Path) -> pathlib.Path:
    memory, error = section_tables(text, "Meta-learning")[-2:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    steps = [int(r[0]) for r in memory]
    left.plot(steps, [value_range(r[1])[0] for r in memory], "o-", label="iMAML (implicit)")
    left.plot(steps, [value_range(r[2])[0] for r in memory], "s-", label="MAML (backprop through K steps)")
    left.set_xlabel("inner steps K")
    left.set_ylabel("memory saved for backward (MiB)")
    left.legend(fontsize=8)
    cg = [int(r[0]) for r in error]
    right.semilogy(cg, [value_range(r[1])[0] for r in error], "o-")
    right.set_xlabel("CG steps")
    right.set_ylabel("meta-gradient relative error")
    fig.suptitle("Meta-gradients: memory and accuracy", fontsize=11)
    fig.tight_layout()
    return save(fig, out / "meta.png")


def plot_small(text: str, out: pathlib.Path) -> pathlib.Path:
    """Time of each call at B = 1 and B = 8, before and (once measured) after the core's overhead work."""
    (table,) = section_tables(text, "The fixed cost of a call: a 4-dimensional fixed point")
    batch, rows = "", []
    for row in table:
        batch = row[0] or batch
        after = value_range(row[6]) if row[6].strip() else None
        rows.append((batch, row[1].replace("`", ""), value_range(row[3]), after))
    batches = list(dict.fromkeys(b for b, _, _, _ in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.6 * len(batches), 5.0), sharey=True)
    for ax, b in zip(axes, batches):
        mine = [r for r in rows if r[0] == b]
        y = range(len(mine))
        before = [(lo + hi) / 2000 for _, _, (lo, hi), _ in mine]
        measured_after = any(a is not None for *_, a in mine)
        colors = ["tab:red" if name.startswith("torchdeq") else "tab:gray" if name.startswith("bare") else "tab:blue"
                  for _, name, _, _ in mine]
        ax.barh([i - 0.2 for i in y], before, 0.4, color=colors, alpha=0.45 if measured_after else 1.0, label="before")
        if measured_after:
            ax.barh([i + 0.2 for i, r in zip(y, mine) if r[3]], [(r[3][0] + r[3][1]) / 2000 for r in mine if r[3]], 0.4,
                    color=[c for c, r in zip(colors, mine) if r[3]], label="after")
        ax.set_yticks(list(y), [name for _, name, _, _ in mine], fontsize=8)
        ax.set_xlabel("time per call (ms; minimum of 300 rounds)")
        ax.set_title(f"B = {b}")
        if measured_after:
            ax.legend(fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("4-dim fixed point: the fixed cost of a call (blue: implicitlayers, gray: bare loop, red: torchdeq)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, out / "small.png")


def save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE, help="folder for the PNGs (default: beside this script)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    text = PAGE.read_text(encoding="utf-8")
    return [plot(text, args.out) for plot in (plot_solvers, plot_backward_memory, plot_jiio, plot_meta, plot_small)]


if __name__ == "__main__":
    for written in main():
        print(written)
