"""`fgvr data list|download|check|stats`: the data set commands (plain argparse, no Hydra run)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fgvr.runtime.errors import ConfigError, DataError, first_line

USAGE = """\
fgvr data list                              the benchmarks, their official counts and how each is fetched
fgvr data download NAME --root DIR          fetch, verify (checksums) and extract NAME under DIR (resumable)
fgvr data check NAME --root DIR [key=value] layout, counts against the official totals, every image decoded
fgvr data stats NAME --root DIR [key=value] class balance, image sizes, box sizes

NAME is a config in configs/data/ (cub, nabirds, cars, aircraft, dogs, flowers, pets, inat2017, folder, csv);
key=value overrides its data config, e.g. level=family for aircraft or train_csv=list.csv for csv."""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fgvr data", usage=USAGE, add_help=True)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", usage="fgvr data list")
    dl = sub.add_parser("download", usage="fgvr data download NAME --root DIR [--remove-archives]")
    dl.add_argument("name")
    dl.add_argument("--root", required=True, type=Path, help="where the archives go and are extracted")
    dl.add_argument("--remove-archives", action="store_true", help="delete the archives once extracted and checked")
    for action, what in (("check", "verify every image"), ("stats", "describe")):
        p = sub.add_parser(action, usage=f"fgvr data {action} NAME --root DIR [key=value ...] [--workers N]",
                           help=what)
        p.add_argument("name")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the data config")
        p.add_argument("--root", help="data.root (the folder `fgvr data download` printed)")
        p.add_argument("--workers", type=int, default=None, help="processes reading images (default: all cores)")
        p.add_argument("--json", type=Path, help="also write the result to this JSON file")
    args, extra = parser.parse_known_args(argv)  # overrides may come after the options too
    if extra and (args.action not in ("check", "stats") or any("=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.action == "list":
        print(listing())
    elif args.action == "download":
        download(args.name, args.root, args.remove_archives)
    else:
        cfg = data_config(args.name, args.root, args.overrides + extra)
        run = {"check": check, "stats": stats}[args.action]
        result, ok = run(cfg, args.workers)
        if args.json:
            from fgvr.runtime.tracker import write_json

            write_json(args.json, result)
        if not ok:
            sys.exit(1)


def listing() -> str:
    from fgvr.data.catalog import BENCHMARKS

    rows = [("name", "data set", "classes", "train", "test", "boxes", "download", "data.root under --root")]
    for b in BENCHMARKS.values():
        rows.append((b.name, b.title, str(b.classes), str(b.train), str(b.test), "yes" if b.boxes else "no",
                     "manual step" if b.manual else "automatic", b.folder))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    align = lambda i, c, w: c.rjust(w) if 2 <= i <= 6 else c.ljust(w)  # noqa: E731
    return "\n".join("  ".join(align(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def data_config(name: str, root: str | None, overrides: list[str]):
    """configs/data/<name>.yaml under the DataConfig schema, with the overrides and data.root."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fgvr.runtime.config import DataConfig, config_dir

    path = config_dir() / "data" / f"{name}.yaml"
    if not path.is_file():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"{name}: no such data set; choose one of {options}")
    overrides = [o.removeprefix("data.") for o in overrides]
    bad = next((o for o in overrides if "=" not in o), None)
    if bad is not None:
        raise ConfigError(f"{bad}: overrides look like key=value (e.g. level=family)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"data.{getattr(e, 'full_key', '') or '?'}: {first_line(e)}") from None
    if root is not None:
        cfg.root = str(Path(root).expanduser().resolve())
    elif cfg.root is None and cfg.synth is None:
        raise ConfigError(f"{name}: pass --root DIR, the data set's folder")
    return cfg


def _cache_dir() -> str:
    """paths.cache_dir at its default (FGVR_CACHE_DIR, or ~/.cache/fgvr)."""
    from omegaconf import OmegaConf

    from fgvr.runtime.config import PathsConfig

    return os.path.expanduser(OmegaConf.structured(PathsConfig).cache_dir)


def _splits(cfg):
    from fgvr.data.readers import read_splits

    return read_splits(cfg, _cache_dir())


def check(cfg, workers: int | None) -> tuple[dict, bool]:
    from dataclasses import asdict

    from fgvr.data.check import check as check_images

    report = check_images(cfg.name, cfg.format.value, str(cfg.root), _splits(cfg), cfg.level, workers, progress=True,
                          counts=cfg.check_counts)
    print(report.format())
    return asdict(report) | {"ok": report.ok}, report.ok


def stats(cfg, workers: int | None) -> tuple[dict, bool]:
    from fgvr.data.stats import format_stats
    from fgvr.data.stats import stats as describe

    result = describe(cfg.name, _splits(cfg), workers, progress=True)
    print(format_stats(result))
    return result, True


def download(name: str, root: Path, remove_archives: bool) -> None:
    from fgvr.data.catalog import BENCHMARKS
    from fgvr.data.check import count_problems
    from fgvr.data.download import download as fetch_all

    if name not in BENCHMARKS:
        raise ConfigError(f"{name}: not a benchmark that can be downloaded; choose one of {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]

    def ready(data_root: Path) -> bool:
        """Whether data_root already holds the whole data set: annotation files, totals, image files."""
        try:
            splits = _splits(data_config(name, str(data_root), []))
        except DataError:
            return False
        records = (splits.train, splits.test)
        return not count_problems(bench, splits) and all(os.path.isfile(p) for r in records for p in r.paths)

    data_root = fetch_all(bench, root.expanduser().resolve(), ready, remove_archives=remove_archives, progress=True)
    print(f"ready: fgvr train data={name} data.root={data_root}")
