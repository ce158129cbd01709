"""Defaults in one place: the schema (fgvr/runtime/config.py) holds every default, the YAML files under
configs/ state only what differs from it, and nothing else (a target's signature, a fallback in the code,
the data catalog) keeps a default of its own that could disagree with it."""

from __future__ import annotations

import ast
import inspect
import shutil
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from omegaconf import MISSING, OmegaConf

from fgvr.runtime.config import (
    BenchConfig,
    DataFormat,
    EvalConfig,
    ExportConfig,
    PredictConfig,
    TrainConfig,
    VizConfig,
    _section,
    config_dir,
    register_schemas,
    target_arguments,
)

SCHEMAS = {"train": TrainConfig, "bench": BenchConfig, "eval": EvalConfig, "viz": VizConfig,  # top-level files
           "predict": PredictConfig, "export": ExportConfig}
HYDRA_KEYS = ("defaults", "hydra")  # Hydra's own, not the schema's
PACKAGE = Path(__file__).resolve().parents[1] / "fgvr"
ABSENT = object()


def schema_of(path: Path, root: Path) -> type | None:
    """The dataclass a YAML file's keys map onto: its command's for a top-level file, TrainConfig for an
    experiment (`# @package _global_`), its group's section for a group option; None for a group typed
    by its `_target_` class alone (selector, texture, head) and Hydra's own groups."""
    rel = path.relative_to(root)
    if len(rel.parts) == 1:
        return SCHEMAS[path.stem]
    if rel.parts[0] == "experiment":
        assert path.read_text().startswith("# @package _global_"), f"{rel}: experiments are global"
        return TrainConfig
    return _section(typing.get_type_hints(TrainConfig).get(rel.parts[0]))


def leaves(node: dict, schema: type, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, the file's value, the schema's default) for every key of `node` the schema types;
    sections are walked into, keys under an untyped section (selector, texture, head) are left out."""
    hints = typing.get_type_hints(schema)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    for key, value in node.items():
        if (not prefix and key in HYDRA_KEYS) or key not in defaults or hints[key] is Any:
            continue
        inner = _section(hints[key])
        if inner is not None and isinstance(value, dict):
            yield from leaves(value, inner, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, defaults[key]


def compose(root: Path, *overrides: str, resolve: bool = False) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_schemas()
    with initialize_config_dir(str(root), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, enum_to_str=True, resolve=resolve)


def select(config: dict, key: str) -> Any:
    """The value at a dotted key; ABSENT where a section on the way is null."""
    for part in key.split("."):
        if not isinstance(config, dict):
            return ABSENT
        config = config[part]
    return config


def built_on(root: Path, experiment: str, scratch: Path) -> dict:
    """The composition an experiment builds on: its defaults list, without the keys it sets itself
    (composed from a copy of `root` in `scratch`)."""
    copy = scratch / "configs"
    if not copy.is_dir():
        shutil.copytree(root, copy)
    path = copy / "experiment" / f"{experiment}.yaml"
    text = path.read_text()
    try:
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])
        path.write_text("# @package _global_\n" + OmegaConf.to_yaml({"defaults": defaults}))
        return compose(copy, f"+experiment={experiment}")
    finally:
        path.write_text(text)


def repeated_defaults(root: Path, scratch: Path) -> list[str]:
    """Every line of a YAML file under `root` that sets a key to the value the schema default already
    gives. An experiment's line counts only where what it builds on (its defaults list) gives that value
    too: one that sets a group option's key back to the schema default changes the composition."""
    found = []
    for path in sorted(root.rglob("*.yaml")):
        schema = schema_of(path, root)
        if schema is None:
            continue
        node = OmegaConf.to_container(OmegaConf.load(path))
        repeats = [(key, value) for key, value, default in leaves(node, schema) if value == default]
        if repeats and schema is TrainConfig and path.parent.name == "experiment":
            base = built_on(root, path.stem, scratch)
            repeats = [(key, value) for key, value in repeats if select(base, key) == value]
        found += [f"{path.relative_to(root.parent)}: {key}: {value!r} is the default in fgvr/runtime/config.py "
                  f"({schema.__name__}); drop the line" for key, value in repeats]
    return found


def test_yaml_files_state_only_what_differs_from_the_schema(tmp_path):
    assert repeated_defaults(config_dir(), tmp_path) == []


def test_a_repeated_default_is_named_with_its_file_key_and_value(tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(config_dir(), root)
    with open(root / "train.yaml", "a") as f:
        f.write("seed: 0\n")
    with open(root / "data" / "cub.yaml", "a") as f:
        f.write("cache: none\n")
    with open(root / "experiment" / "cub.yaml", "a") as f:
        f.write("logger:\n  project: fgvr\n")
    with open(root / "experiment" / "synth_parts.yaml", "a") as f:
        f.write("data:\n  img_size: 224\n")  # the schema's, but not what data=synth_parts gives: a change
    assert repeated_defaults(root, tmp_path / "scratch") == [
        "configs/data/cub.yaml: cache: 'none' is the default in fgvr/runtime/config.py (DataConfig); drop the line",
        "configs/experiment/cub.yaml: logger.project: 'fgvr' is the default in fgvr/runtime/config.py (TrainConfig); "
        "drop the line",
        "configs/train.yaml: seed: 0 is the default in fgvr/runtime/config.py (TrainConfig); drop the line"]


def test_schema_defaults_agree_with_the_targets_they_configure():
    """A schema field that is also an argument of its section's default `_target_` has one default."""
    from hydra.utils import get_object

    checked = 0
    for schema in filter(None, map(_section, typing.get_type_hints(TrainConfig).values())):
        target = getattr(schema, "_target_", None)
        if target is None or target == MISSING:
            continue
        arguments = target_arguments(get_object(target))
        defaults = OmegaConf.to_container(OmegaConf.structured(schema))
        for name, default in defaults.items():
            given = arguments.get(name, inspect.Parameter.empty)
            if given is inspect.Parameter.empty or (given is None and default in ({}, [])):
                continue  # no default there, or Python's None for an empty container
            assert given == default, f"{schema.__name__}.{name}: {default!r} here, {given!r} in {target}"
            checked += 1
    assert checked >= 3  # pretrained, checkpoint, drop_path_rate of the backbone


@pytest.mark.parametrize("group", ["backbone", "optim", "logger"])
def test_every_option_of_a_typed_group_passes_only_what_its_target_takes(group):
    """Each option's keys reach its `_target_` (one step from `group=option` to its class)."""
    from fgvr.engine.optim import build_optimizer
    from fgvr.runtime.config import instantiate

    for option in sorted(p.stem for p in (config_dir() / group).glob("*.yaml")):
        node = OmegaConf.create(compose(config_dir(), f"{group}={option}", resolve=True)[group])
        if group == "optim":
            optimizer = build_optimizer(torch.nn.Linear(2, 2), node, torch.device("cpu"), node.lr)
            assert type(optimizer).__name__ == node._target_.rsplit(".", 1)[-1]
        elif node._target_ is not None:
            instantiate(group, node, _partial_=True)


def fallbacks() -> Iterator[tuple[str, str, Any]]:
    """(where, key, value) for every `cfg.get("key", value)` and `getattr(cfg, "key", value)` in fgvr/
    whose receiver is a config (its source names cfg or config)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and len(call.args) == 2:
                receiver, (key, value) = func.value, call.args
            elif isinstance(func, ast.Name) and func.id == "getattr" and len(call.args) == 3:
                receiver, key, value = call.args
            else:
                continue
            if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and \
                    any(word in ast.unparse(receiver) for word in ("cfg", "config")):
                yield f"{path.relative_to(PACKAGE.parent)}:{call.lineno}", key.value, value.value


def schema_defaults() -> dict[str, list[Any]]:
    """Every schema field's name -> its defaults (in any section that has it)."""
    out: dict[str, list[Any]] = {}
    schemas = [TrainConfig, BenchConfig, EvalConfig, VizConfig]
    while schemas:
        schema = schemas.pop()
        defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
        for name, hint in typing.get_type_hints(schema).items():
            out.setdefault(name, []).append(defaults[name])
            schemas += [s for s in [_section(hint)] if s is not None]
    return out


def test_the_code_falls_back_to_no_default_of_its_own():
    """A config key the code reads with a fallback must fall back to the schema's default (older runs'
    configs get their missing keys from the schema: runtime/config.py with_defaults)."""
    defaults = schema_defaults()
    wrong = [f"{where}: {key}={value!r}, the schema's is {' or '.join(map(repr, defaults[key]))}"
             for where, key, value in fallbacks() if key in defaults and value not in defaults[key]]
    assert wrong == []


def test_the_catalog_and_the_schema_name_the_same_benchmarks():
    """data.format names a benchmark of the catalog (its reader and totals), or a layout of one's own."""
    from fgvr.data.catalog import BENCHMARKS
    from fgvr.data.readers import reader

    own = {DataFormat.folder, DataFormat.csv, DataFormat.synth}
    assert {f.value for f in DataFormat if f not in own} == set(BENCHMARKS)
    assert all(callable(reader(f)) for f in DataFormat)
    for path in (config_dir() / "data").glob("*.yaml"):
        fmt = OmegaConf.load(path).format
        assert fmt == path.stem or fmt not in BENCHMARKS, f"{path.name}: format {fmt} is another benchmark's"

