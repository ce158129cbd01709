"""`fgvr table`: a paper's result table (rows = methods, columns = data sets, cells = mean +- std
of a metric over seeds) regenerated from the run dirs alone, or from their W&B runs.

Every source of runs (`read_run_dir`; `fgvr.commands.wandb_runs.read_wandb`) produces the same
`Record` (the run's flat config and results), so the table maths (`build_table`) and the formats
never depend on where the runs came from.

Runs are averaged only when they differ in nothing but keys that cannot change a result (the
schema's neutral ones, fgvr/runtime/config.py: the seed, where the data lives, logging, workers,
compilation): a key that varies otherwise is added to the row label, and the table says which keys
those were. Runs that failed, are still
running or lack the metric are listed under the table, never averaged in or dropped. A seed counts
once: of runs that agree on every setting and the seed (a relaunch into a new dir), only the one
that ended last is averaged, and the table names the others.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgvr.commands.records import Record, read_run_dir, run_dirs
from fgvr.commands.wandb_runs import read_wandb
from fgvr.runtime.config import neutral
from fgvr.runtime.errors import ConfigError, DataError
from fgvr.runtime.files import atomic_write, write_text_atomic

# The config choices results.json records, in the order they label a row.
CHOICES = ("dataset", "backbone_config", "method", "selector", "texture", "head")
FORMATS = ("md", "csv", "latex", "json")
# Choices that are no method but a bound: their rows say so, and are never the column's best
# (csv and json keep the plain name).
BOUNDS = {("selector", "oracle"): "oracle (upper bound)"}


@dataclass
class Cell:
    """mean, sample standard deviation (None for one run) and number of runs."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Cell":
        """statistics' exact sums: equal values give a std of exactly 0, and no rounding noise."""
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Reference:
    """A published number for the method and data set of a cell."""

    method: str
    mean: float
    std: float | None  # None where the paper gives one number
    delta: float  # the cell's mean minus the published one

    def text(self, pm: str = " ± ") -> str:
        return f"{self.mean:.2f}" + (f"{pm}{self.std:.2f}" if self.std is not None else "")


def paper_results() -> dict:
    """The published tables (fgvr/commands/paper_results.json, with their source)."""
    return json.loads(Path(__file__).with_name("paper_results.json").read_text())


@dataclass
class Repeat:
    """Runs of one cell that agree on every setting and the seed: only the one that ended last counts."""

    row: tuple
    col: tuple
    seed: Any
    kept: str  # its source
    left_out: list[str]  # the sources of the older ones


@dataclass
class Table:
    metric: str
    row_keys: list[str]  # the --rows keys, then the keys that varied within a method
    col_keys: list[str]
    rows: list[tuple]  # row labels: one value per row key
    cols: list[tuple]
    cells: dict[tuple[tuple, tuple], Cell]
    extras: dict[str, dict[tuple, Cell]]  # extra column -> row -> Cell over the row's runs
    varied: list[str]  # keys that differed between runs of one cell, so they split rows
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (run dir, why)
    reference: dict[tuple[tuple, tuple], Reference] = field(default_factory=dict)
    reference_source: str = ""
    repeats: list[Repeat] = field(default_factory=list)

    def is_bound(self, row: tuple, keys: list[str] | None = None) -> bool:
        return any((k, v) in BOUNDS for k, v in zip(self.row_keys if keys is None else keys, row))

    def best(self) -> set[tuple[tuple, tuple]]:
        """The cells with the highest mean among the methods of a data set (all of them on a tie),
        bounds left out: per column when the methods are rows, per row when they are the columns
        (`--rows dataset`, the GLSim paper's layout). Nothing where there is one method."""
        by_row = "dataset" in self.row_keys and "dataset" not in self.col_keys
        best: set[tuple[tuple, tuple]] = set()
        for group in self.rows if by_row else self.cols:
            means = {(r, c): cell.mean for (r, c), cell in self.cells.items() if (r if by_row else c) == group
                     and not self.is_bound(r) and not self.is_bound(c, self.col_keys)}
            if len(means) > 1:
                top = max(means.values())
                best |= {key for key, mean in means.items() if mean == top}
        return best


def _value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def decode(label: tuple[str, ...]) -> tuple:
    return tuple(json.loads(v) for v in label)


def drop_repeats(runs: list[Record]) -> tuple[list[Record], list[tuple[Any, Record, list[Record]]]]:
    """The runs of one cell with each seed once: of runs with the same seed, the one that ended last
    (on a tie or no end time, the last listed). Returns the runs kept and (seed, kept, left out) per
    repeated seed. Runs without a seed are all kept: nothing says they repeat one another."""
    by_seed: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        if r.get("seed") is not None:
            by_seed.setdefault(_value_key(r.get("seed")), []).append(i)
    dropped: set[int] = set()
    repeats = []
    for same in by_seed.values():
        if len(same) > 1:
            newest = max(same, key=lambda i: (runs[i].ended is not None, runs[i].ended or 0.0, i))
            older = [i for i in same if i != newest]
            dropped.update(older)
            repeats.append((runs[newest].get("seed"), runs[newest], [runs[i] for i in older]))
    return [r for i, r in enumerate(runs) if i not in dropped], repeats


def build_table(records: list[Record], rows: list[str], cols: list[str], metric: str = "test_acc",
                extras: tuple[str, ...] = (), reference: dict | None = None) -> Table:
    """`reference` (paper_results()): beside each cell whose runs all match a published method
    (its "match" keys) the published number for the cell's data set."""
    why = {"failed": "failed: {error}", "interrupted": "interrupted (it resumes when relaunched)",
           "no results": "no results.json: still running, or it died before writing it",
           "unreadable": "results.json is not valid JSON", "running": "still running",
           "crashed": "crashed: W&B lost contact with it", "killed": "killed",
           "no summary": "W&B has no fgvr results for it (its summary lacks status)"}
    left_out, used = [], []
    for r in records:
        if r.status != "finished":
            reason = why.get(r.status, r.status).format(error=r.results.get("error", "see its train.log"))
            left_out.append((r.source, reason))
        elif not isinstance(r.get(metric), (int, float)):
            left_out.append((r.source, f"finished without {metric}"))
        else:
            used.append(r)

    def cells_of(row_keys: list[str]) -> dict[tuple[tuple, tuple], list[Record]]:
        cells: dict[tuple[tuple, tuple], list[Record]] = {}
        for r in used:
            key = (tuple(_value_key(r.get(k)) for k in row_keys), tuple(_value_key(r.get(k)) for k in cols))
            cells.setdefault(key, []).append(r)
        return cells

    def varying(cells: dict, keys) -> list[str]:
        """The keys among `keys` whose value differs between two runs of one cell."""
        return sorted({k for runs in cells.values() for k in keys(runs)
                       if k not in rows and k not in cols and not neutral(k)
                       and len({_value_key(r.get(k)) for r in runs}) > 1})

    # Runs that would share a cell but differ in more than the seed are kept apart: first by the
    # config choices results.json names (selector, head, backbone_config, ...), then by any config
    # key that still differs.
    choices = varying(cells_of(rows), lambda runs: CHOICES)
    varied_config = varying(cells_of(rows + choices), lambda runs: {k for r in runs for k in r.config})
    varied = choices + varied_config
    row_keys = rows + varied
    grouped = cells_of(row_keys)
    repeats = []
    for (r, c), runs in list(grouped.items()):
        grouped[(r, c)], repeated = drop_repeats(runs)
        repeats += [Repeat(decode(r), decode(c), seed, kept.source, [x.source for x in older])
                    for seed, kept, older in repeated]
    row_labels = list(dict.fromkeys(k[0] for k in grouped))  # in the order the runs come (a sweep's job order)
    col_labels = list(dict.fromkeys(k[1] for k in grouped))
    table_cells = {(decode(r), decode(c)): Cell.of([float(x.get(metric)) for x in runs])
                   for (r, c), runs in grouped.items()}
    extra_cells: dict[str, dict[tuple, Cell]] = {}
    for key in extras:
        per_row: dict[tuple, list[float]] = {}
        for (r, _), runs in grouped.items():
            per_row.setdefault(decode(r), []).extend(float(x.get(key)) for x in runs
                                                     if isinstance(x.get(key), (int, float)))
        extra_cells[key] = {r: Cell.of(v) for r, v in per_row.items() if v}
    published: dict[tuple[tuple, tuple], Reference] = {}
    if reference is not None and reference.get("metric") == metric:
        for (r, c), runs in grouped.items():
            for method, entry in reference["methods"].items():
                matches = entry["match"] and all(x.get(k) == v for x in runs for k, v in entry["match"].items())
                result = entry["results"].get(runs[0].get("dataset")) if matches else None
                if result is not None:
                    cell = table_cells[(decode(r), decode(c))]
                    published[(decode(r), decode(c))] = Reference(method, *result, delta=cell.mean - result[0])
    return Table(metric, row_keys, cols, [decode(r) for r in row_labels], [decode(c) for c in col_labels],
                 table_cells, extra_cells, varied, left_out, published,
                 reference["source"] if reference is not None else "", repeats)


def _label(values: tuple) -> str:
    return " / ".join("-" if v is None else str(v) for v in values)


def _row_label(table: Table, row: tuple) -> str:
    return _label(tuple(BOUNDS.get((k, v), v) for k, v in zip(table.row_keys, row)))


def _number(cell: Cell | None, digits: int, pm: str = " ± ") -> str:
    if cell is None:
        return ""
    text = f"{cell.mean:.{digits}f}"
    if cell.std is not None:
        text += f"{pm}{cell.std:.{digits}f}"
    return f"{text} ({cell.n})"


def _body(table: Table, digits: int, pm: str, bold, published) -> list[list[str]]:
    """The text of every row: label, cells (the best of a column through `bold`, a published
    number through `published`), extras."""
    lines, best = [], table.best()
    for row in table.rows:
        cells = [_row_label(table, row)]
        for col in table.cols:
            text = _number(table.cells.get((row, col)), digits, pm)
            if (row, col) in best:
                text = bold(text)
            if (row, col) in table.reference:
                text += published(table.reference[(row, col)])
            cells.append(text)
        lines.append(cells + [_number(table.extras[k].get(row), digits, pm) for k in table.extras])
    return lines


def _header(table: Table) -> list[str]:
    return [" / ".join(table.row_keys)] + [_label(c) for c in table.cols] + list(table.extras)


def _notes(table: Table) -> list[str]:
    notes = [f"cells: {table.metric}, mean ± sample std (runs) over seeds"]
    if any(map(table.is_bound, table.rows)):
        notes.append("oracle: the ground-truth box as the crop, at training and at test; an upper bound for "
                     "the selectors, not a method")
    if table.varied:
        notes.append(f"kept apart because they varied between runs of one cell: {', '.join(table.varied)}")
    if table.reference_source:
        notes.append(f"paper: {table.reference_source}; delta = ours - paper")
    for repeat in table.repeats:
        n = len(repeat.left_out)
        notes.append(f"note: {n} run{'s' if n > 1 else ''} repeat{'' if n > 1 else 's'} seed {repeat.seed} of "
                     f"{_row_label(table, repeat.row)} ({_label(repeat.col)}): kept {repeat.kept} (it ended last), "
                     f"left out {', '.join(repeat.left_out)}")
    if table.left_out:
        notes.append(f"not in the table ({len(table.left_out)} runs):")
        notes += [f"  {why}: {source}" for source, why in table.left_out]
    return notes


def to_markdown(table: Table, digits: int = 2) -> str:
    lines = ["| " + " | ".join(_header(table)) + " |", "|" + "---|" * len(_header(table))]
    body = _body(table, digits, " ± ", lambda text: f"**{text}**",
                 lambda p: f" (paper {p.method} {p.text()}, Δ {p.delta:+.2f})")
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines + [""] + _notes(table)) + "\n"


def to_csv(table: Table) -> str:
    """One line per cell: the row and column keys, the metric's mean, std and n (and, compared with
    the paper, its method, mean and std and the difference)."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    compared = bool(table.reference_source)
    writer.writerow([*table.row_keys, *table.col_keys, "metric", "mean", "std", "n",
                     *(["paper_method", "paper_mean", "paper_std", "delta"] if compared else [])])
    for row in table.rows:
        for col in table.cols:
            cell = table.cells.get((row, col))
            if cell is not None:
                p = table.reference.get((row, col))
                paper = ([p.method, p.mean, p.std, p.delta] if p else [""] * 4) if compared else []
                writer.writerow([*row, *col, table.metric, cell.mean, "" if cell.std is None else cell.std, cell.n,
                                 *paper])
        for key, per_row in table.extras.items():
            if row in per_row:
                cell = per_row[row]
                writer.writerow([*row, *([""] * len(table.col_keys)), key, cell.mean,
                                 "" if cell.std is None else cell.std, cell.n])
    return out.getvalue()


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table, digits: int = 2) -> str:
    """A booktabs tabular (\\usepackage{booktabs}); the best mean of each column in bold."""
    header = _header(table)
    lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    body = _body(table, digits, r" $\pm$ ", lambda text: rf"\textbf{{{text}}}",  # numbers need no escaping
                 lambda p: rf" (paper {p.mean:.2f}, $\Delta$ {p.delta:+.2f})")
    lines += [" & ".join([latex_escape(label), *cells]) + r" \\" for label, *cells in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n" + "".join(f"% {n}\n" for n in _notes(table))


def to_json(table: Table) -> str:
    def cell(c: Cell) -> dict:
        return {"mean": c.mean, "std": c.std, "n": c.n}

    doc = {"metric": table.metric, "row_keys": table.row_keys, "col_keys": table.col_keys, "varied": table.varied,
           "cells": [{"row": list(r), "col": list(c), **cell(table.cells[(r, c)]),
                      **({"paper": vars(table.reference[(r, c)])} if (r, c) in table.reference else {})}
                     for r in table.rows for c in table.cols if (r, c) in table.cells],
           "extras": {k: [{"row": list(r), **cell(per_row[r])} for r in table.rows if r in per_row]
                      for k, per_row in table.extras.items()},
           "left_out": [{"run": s, "why": w} for s, w in table.left_out]}
    if table.repeats:
        doc["repeats"] = [{"row": list(r.row), "col": list(r.col), "seed": r.seed, "kept": r.kept,
                           "left_out": r.left_out} for r in table.repeats]
    if table.reference_source:
        doc["paper_source"] = table.reference_source
    return json.dumps(doc, indent=2) + "\n"


def plot(table: Table, speed: Table, path: Path) -> int:
    """Accuracy against throughput (the GLSim paper's figure): one point per row with error bars
    (std over its runs) on both axes, one panel per column; written atomically as a PNG. Returns
    the number of points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table.cols), figsize=(5 * len(table.cols), 4), squeeze=False)
    points = 0
    for ax, col in zip(axes[0], table.cols):
        for row in table.rows:
            y, x = table.cells.get((row, col)), speed.cells.get((row, col))
            if x is None or y is None:
                continue
            ax.errorbar(x.mean, y.mean, xerr=x.std or 0, yerr=y.std or 0, fmt="o", capsize=3)
            ax.annotate(_row_label(table, row), (x.mean, y.mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
            points += 1
        ax.set(xlabel=speed.metric, ylabel=table.metric, title=_label(col))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return points


def render(table: Table, fmt: str, digits: int = 2) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt in ("md", "latex"):
        return (to_markdown if fmt == "md" else to_latex)(table, digits)
    return (to_csv if fmt == "csv" else to_json)(table)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fgvr table", description="A result table (mean ± std over seeds) from run dirs and sweep dirs, "
                                       "or from W&B runs (--source wandb).")
    parser.add_argument("paths", nargs="*", help="run dirs, sweep dirs (searched below) or glob patterns")
    parser.add_argument("--source", choices=("dirs", "wandb"), default="dirs",
                        help="dirs: the run dirs named (default); wandb: the runs of a W&B project")
    parser.add_argument("--project", help="ENTITY/PROJECT of the W&B runs (--source wandb)")
    parser.add_argument("--group", help="only the W&B runs of this group (a sweep's is its sweep dir's name)")
    parser.add_argument("--filters", help="only the W&B runs this query selects, as JSON in W&B's MongoDB "
                        "syntax: e.g. '{\"config.data.name\": \"cub\", \"tags\": \"paper\"}'")
    parser.add_argument("--rows", default="selector", help="keys labelling a row (default: selector)")
    parser.add_argument("--cols", default="dataset", help="keys labelling a column (default: dataset)")
    parser.add_argument("--metric", default="test_acc", help="the results.json field in the cells")
    parser.add_argument("--extra", default="", help="more columns, per row: e.g. train_img_per_s,peak_mem_mb,"
                                                     "cost.gflops_per_image.total,crop_iou")
    parser.add_argument("--format", default="md", choices=FORMATS)
    parser.add_argument("--digits", type=int, default=2, help="decimals (md, latex)")
    parser.add_argument("--plot", type=Path, help="also draw the metric against --speed into this PNG")
    parser.add_argument("--speed", default="eval_img_per_s", help="the plot's x axis (default: eval_img_per_s, "
                        "inference throughput as in the GLSim paper; train_img_per_s for training)")
    parser.add_argument("--compare", choices=["paper"], help="beside each cell, the published number for its "
                        "method and data set (fgvr/commands/paper_results.json) and the difference")
    parser.add_argument("--out", type=Path, help="write the table to this file instead of printing it")
    args = parser.parse_args(argv)
    keys = lambda text: [k.strip() for k in text.split(",") if k.strip()]  # noqa: E731
    if args.source == "wandb":
        if args.paths or not args.project:
            raise ConfigError("--source wandb takes --project ENTITY/PROJECT and no paths")
        records = read_wandb(args.project, args.group, args.filters)
        if not records:
            raise DataError(f"W&B {args.project}: no runs{' in group ' + args.group if args.group else ''}"
                            f"{' matching --filters ' + args.filters if args.filters else ''}")
    else:
        if not args.paths or args.project or args.group or args.filters:
            raise ConfigError("give run dirs or sweep dirs; --project, --group and --filters go with --source wandb")
        records = [read_run_dir(p) for p in run_dirs(args.paths)]
        if not records:
            raise DataError(f"{' '.join(args.paths)}: no run dirs there (a run dir holds results.json or .hydra/)")
    table = build_table(records, keys(args.rows), keys(args.cols), args.metric, tuple(keys(args.extra)),
                        paper_results() if args.compare == "paper" else None)
    if not table.cells:
        raise DataError(f"none of the {len(records)} runs finished with {args.metric}, e.g. "
                        f"{table.left_out[0][0]} ({table.left_out[0][1]})")
    text = render(table, args.format, args.digits)
    if args.plot is not None:
        speed = build_table(records, keys(args.rows), keys(args.cols), args.speed)
        print(f"wrote {args.plot}: {plot(table, speed, args.plot)} points", file=sys.stderr)
    if args.out is None:
        print(text, end="")
    else:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}")
