"""`fgvr table`: the table maths, grouping and its guard, the formats (golden files) and the
runs that cannot be in a table."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fgvr.cli import main
from fgvr.commands.table import Cell, build_table, latex_escape, plot, read_run_dir, render, run_dirs
from tests.conftest import TINY, fgvr

GOLDEN = Path(__file__).parent / "golden"


def write_run(run_dir: Path, selector: str = "glsim", seed: int = 1, acc: float | None = 90.0, dataset: str = "cub",
              status: str = "finished", config: dict | None = None, **results) -> Path:
    """A run dir as `fgvr train` leaves it: .hydra/config.yaml and results.json (None: still running)."""
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "name": dataset, "data": {"name": dataset, "root": f"/data/{dataset}", "img_size": 224},
           "selector": {"_target_": "fgvr.models.selectors.GLSimSelector", "top_k": 8} if selector == "glsim" else {},
           "optim": {"lr": 0.01}, "head": {"_target_": "fgvr.models.heads.LinearHead"}}
    for key, value in (config or {}).items():  # dotted overrides
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if status != "running":
        out = {"status": status, "dataset": dataset, "selector": selector, "texture": "none", "head": "linear",
               "backbone_config": "vit_b16", "seed": seed, **results}
        if acc is not None:
            out["test_acc"] = acc
        (run_dir / "results.json").write_text(json.dumps(out))
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    return write_sweep(tmp_path / "sweep")


def write_sweep(root: Path) -> Path:
    """2 selectors x 3 seeds on two data sets, as a sweep dir of numbered jobs."""
    accs = {("none", "cub"): [90.0, 90.2, 90.4], ("glsim", "cub"): [91.0, 90.5, 91.3],
            ("none", "dogs"): [91.4, 91.3, 91.2], ("glsim", "dogs"): [92.0, 92.1, 91.9]}
    job = 0
    for (selector, dataset), values in accs.items():
        for seed, acc in zip((1, 10, 100), values):
            write_run(root / str(job), selector, seed, acc, dataset,
                      train_img_per_s=100.0 + job, cost={"gflops_per_image": {"total": 17.6 if selector == "none"
                                                                             else 35.2}})
            job += 1
    return root


def test_cell_is_mean_sample_std_and_n():
    cell = Cell.of([90.0, 91.0, 92.0])
    assert (cell.mean, cell.std, cell.n) == (91.0, 1.0, 3)  # the sample std (n - 1), as papers report
    assert Cell.of([5.0]) == Cell(5.0, None, 1)  # one seed: no std


def test_a_sweep_becomes_methods_by_data_sets(sweep):
    records = [read_run_dir(d) for d in run_dirs([str(sweep)])]
    assert [Path(r.source).name for r in records] == [str(i) for i in range(12)]  # job order: 0, 1, ..., 11
    table = build_table(records, ["selector"], ["dataset"])
    assert table.rows == [("none",), ("glsim",)] and table.cols == [("cub",), ("dogs",)]  # in job order
    assert table.cells[(("glsim",), ("cub",))].mean == pytest.approx(90.9333, abs=1e-4)
    assert table.cells[(("none",), ("dogs",))].std == pytest.approx(0.1)
    assert (("glsim",), ("cub",)) in table.best() and (("none",), ("cub",)) not in table.best()
    assert table.varied == [] and table.left_out == []
    table.cells[(("none",), ("cub",))] = table.cells[(("glsim",), ("cub",))]
    assert {(("glsim",), ("cub",)), (("none",), ("cub",))} <= table.best()  # a tie: both in bold


def test_runs_that_differ_in_more_than_the_seed_are_kept_apart(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / f"k8_{seed}", seed=seed, acc=90.0 + seed)
        write_run(tmp_path / f"k16_{seed}", seed=seed, acc=80.0 + seed, config={"selector.top_k": 16})
        # keys that cannot change a result: averaged together (other seeds: the same seed would be a repeat)
        write_run(tmp_path / f"moved_{seed}", seed=seed + 2, acc=90.0 + seed,
                  config={"data.root": "/elsewhere", "data.num_workers": 3})
    table = build_table([read_run_dir(d) for d in run_dirs([str(tmp_path)])], ["selector"], ["dataset"])
    assert table.varied == ["selector.top_k"] and table.row_keys == ["selector", "selector.top_k"]
    assert table.rows == [("glsim", 8), ("glsim", 16)]
    assert table.cells[(("glsim", 8), ("cub",))].n == 4 and table.cells[(("glsim", 16), ("cub",))].mean == 81.5
    assert "kept apart because they varied between runs of one cell: selector.top_k" in render(table, "md")


def test_a_varied_config_choice_labels_the_row_by_its_name(tmp_path):
    write_run(tmp_path / "a", acc=90.0)
    b = write_run(tmp_path / "b", acc=91.0, config={"head._target_": "fgvr.models.heads.AggregatorHead"})
    results = json.loads((b / "results.json").read_text()) | {"head": "aggregator"}
    (b / "results.json").write_text(json.dumps(results))
    table = build_table([read_run_dir(tmp_path / d) for d in "ab"], ["selector"], ["dataset"])
    assert table.varied == ["head"] and table.rows == [("glsim", "linear"), ("glsim", "aggregator")]


def test_failed_running_and_metricless_runs_are_listed_not_averaged(tmp_path):
    write_run(tmp_path / "ok", acc=90.0)
    write_run(tmp_path / "bad", acc=None, status="failed", error="DataError: data.root=/x: no such folder")
    write_run(tmp_path / "busy", status="running")
    write_run(tmp_path / "stopped", acc=None, status="interrupted")
    write_run(tmp_path / "noacc", acc=None)
    (write_run(tmp_path / "torn", acc=None) / "results.json").write_text('{"status": "fini')
    table = build_table([read_run_dir(d) for d in run_dirs([str(tmp_path)])], ["selector"], ["dataset"])
    assert table.cells[(("glsim",), ("cub",))].n == 1
    assert dict((Path(s).name, why) for s, why in table.left_out) == {
        "bad": "failed: DataError: data.root=/x: no such folder",
        "busy": "no results.json: still running, or it died before writing it",
        "stopped": "interrupted (it resumes when relaunched)", "noacc": "finished without test_acc",
        "torn": "results.json is not valid JSON"}
    md = render(table, "md")
    assert "not in the table (5 runs):" in md
    assert f"  interrupted (it resumes when relaunched): {tmp_path / 'stopped'}" in md


@pytest.mark.parametrize("fmt,suffix", [("md", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json")])
def test_each_format_matches_its_golden_file(sweep, fmt, suffix):
    records = [read_run_dir(d) for d in run_dirs([str(sweep)])]
    table = build_table(records, ["selector"], ["dataset"], extras=("train_img_per_s", "cost.gflops_per_image.total"))
    assert table.left_out == []
    text = render(table, fmt)
    assert text == (GOLDEN / f"table.{suffix}").read_text(), text


def test_compare_with_the_paper(tmp_path, capsys):
    """GLSim and the ViT-B/16 baseline on CUB and Dogs beside Table 4 of the paper."""
    for seed, (glsim, vit) in zip((1, 10, 100), ((91.0, 90.0), (91.2, 90.1), (90.8, 90.2))):
        write_run(tmp_path / f"g{seed}", "glsim", seed, glsim)
        write_run(tmp_path / f"v{seed}", "none", seed, vit)
    write_run(tmp_path / "other", "none", 1, 80.0, config={"backbone.name": "resnet50"},
              backbone_config="resnet50")  # not the paper's backbone: nothing to compare with
    main(["table", str(tmp_path), "--rows", "selector,backbone_config", "--compare", "paper"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| glsim / vit_b16 | **91.00 ± 0.20 (3)** (paper GLSim 90.93 ± 0.24, Δ +0.07) |"
    assert lines[3] == "| none / resnet50 | 80.00 (1) |"  # rows in the order of their dirs: other before v1
    assert lines[4] == "| none / vit_b16 | 90.10 ± 0.10 (3) (paper ViT-B/16 90.11 ± 0.17, Δ -0.01) |"
    assert any(line.startswith("paper: GLSim paper") and "Table 4" in line for line in lines)
    main(["table", str(tmp_path), "--rows", "selector,backbone_config", "--compare", "paper", "--format", "csv"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].endswith("paper_method,paper_mean,paper_std,delta") and ",GLSim,90.93,0.24," in rows[1]


def test_compare_the_methods_with_the_paper_in_its_layout(tmp_path, capsys):
    """Data sets as rows and methods as columns, as Table 4: TransFG matched by its method, CAL's one
    published number (no std) by its ResNet-101; runs from before methods existed count as method none."""
    for seed, (vit, transfg, cal) in zip((1, 10, 100), ((90.0, 90.4, 88.0), (90.1, 90.6, 88.2), (90.2, 90.5, 88.1))):
        write_run(tmp_path / f"v{seed}", "none", seed, vit)  # no method key: an older run
        config = {"method": {"_target_": "fgvr.models.methods.transfg.TransFG"}}
        write_run(tmp_path / f"t{seed}", "none", seed, transfg, config=config, method="transfg")
        write_run(tmp_path / f"c{seed}", "none", seed, cal, config={"method": {"_target_": "fgvr.models.methods.cal.CAL"}},
                  method="cal", backbone_config="resnet101")
    main(["table", str(tmp_path), "--rows", "dataset", "--cols", "method,selector", "--compare", "paper"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| dataset | cal / none | transfg / none | none / none |"
    assert lines[2] == ("| cub | 88.10 ± 0.10 (3) (paper CAL 88.44, Δ -0.34) | **90.50 ± 0.10 (3)** (paper TransFG "
                        "90.49 ± 0.06, Δ +0.01) | 90.10 ± 0.10 (3) (paper ViT-B/16 90.11 ± 0.17, Δ -0.01) |")


def test_runs_with_test_time_augmentation_are_kept_apart(tmp_path):
    for seed in (1, 10):
        for tta in (False, True):
            config = {"method": {"_target_": "fgvr.models.methods.cal.CAL", "tta": tta}}
            write_run(tmp_path / f"{tta}{seed}", "none", seed, 88.0 + tta, config=config, method="cal")
    table = build_table([read_run_dir(p) for p in run_dirs([str(tmp_path)])], ["method"], ["dataset"])
    assert table.varied == ["method.tta"] and len(table.rows) == 2
    assert sorted(c.mean for c in table.cells.values()) == [88.0, 89.0]


def test_plot_has_a_point_per_method_and_data_set(sweep, tmp_path, capsys):
    import cv2

    main(["table", str(sweep), "--plot", str(tmp_path / "acc.png"), "--speed", "train_img_per_s"])
    assert "acc.png: 4 points" in capsys.readouterr().err  # 2 selectors x 2 data sets
    image = cv2.imread(str(tmp_path / "acc.png"))
    assert image is not None and image.shape == (400, 1000, 3)  # two panels of 5 x 4 inches at 100 dpi
    records = [read_run_dir(d) for d in run_dirs([str(sweep)])]
    acc = build_table(records, ["selector"], ["dataset"])
    speed = build_table(records[:3], ["selector"], ["dataset"], "train_img_per_s")  # only some runs have a speed
    assert plot(acc, speed, tmp_path / "few.png") == 1


def test_latex_escapes_names():
    assert latex_escape("vit_b16 & 100% $x$ #1 {a} ~^\\") == \
        r"vit\_b16 \& 100\% \$x\$ \#1 \{a\} \textasciitilde{}\textasciicircum{}\textbackslash{}"


def test_table_command_writes_each_format(sweep, tmp_path, capsys):
    main(["table", str(sweep), "--rows", "selector", "--cols", "dataset"])
    out = capsys.readouterr().out
    assert out.startswith("| selector | cub | dogs |") and "**90.93 ± 0.40 (3)**" in out
    main(["table", str(sweep / "*"), "--format", "latex", "--out", str(tmp_path / "t.tex")])  # a glob of run dirs
    assert (tmp_path / "t.tex").read_text().startswith(r"\begin{tabular}{lrr}")


@pytest.mark.parametrize("args,message", [
    (["/nowhere"], "fgvr table: error: /nowhere: no such run dir or sweep dir"),
    (["EMPTY"], "no run dirs there"),
    (["FAILED"], "none of the 1 runs finished with test_acc, e.g. "),
    (["BADCFG"], "config.yaml: not a readable config (ParserError); restore or remove it"),
])
def test_table_command_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "failed" / "0", acc=None, status="failed", error="boom")
    (write_run(tmp_path / "badcfg" / "0") / ".hydra" / "config.yaml").write_text("data: {name: [")
    named = {"EMPTY": tmp_path / "empty", "FAILED": tmp_path / "failed", "BADCFG": tmp_path / "badcfg"}
    args = [str(named.get(a, a)) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["table", *args])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (Debian: texlive-latex-recommended)")
def test_latex_compiles_without_errors(sweep, tmp_path):
    (tmp_path / "table.tex").write_text(render(build_table([read_run_dir(d) for d in run_dirs([str(sweep)])],
                                                           ["selector"], ["dataset"]), "latex"))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      "\\input{table}\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text()
    assert proc.returncode == 0 and "Warning" not in log and "Overfull" not in log, proc.stdout[-2000:]


@pytest.mark.slow
def test_a_real_sweep_end_to_end(tmp_path):
    """2 selectors x 2 seeds of `fgvr train` on the synthetic default, then `fgvr table` on the sweep."""
    fgvr("train", "--multirun", "selector=none,random", "seed=1,2", *TINY, "trainer.epochs=1", cwd=tmp_path,
         timeout=600)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    out = fgvr("table", str(sweep), "--extra", "train_img_per_s", cwd=tmp_path).stdout
    lines = out.splitlines()
    assert lines[0] == "| selector | synth | train_img_per_s |"
    accs = {s: [json.loads((d / "results.json").read_text())["test_acc"] for d in sorted(sweep.iterdir())
                if d.is_dir() and json.loads((d / "results.json").read_text())["selector"] == s]
            for s in ("none", "random")}
    for row, selector in zip(lines[2:4], ("none", "random")):
        cell = Cell.of(accs[selector])
        assert row.startswith(f"| {selector} | ") and f"{cell.mean:.2f} ± {cell.std:.2f} (2)" in row, (row, accs)
    latex = fgvr("table", str(sweep), "--format", "latex", cwd=tmp_path).stdout
    assert r"\toprule" in latex and r"\bottomrule" in latex


def test_the_oracle_row_is_labelled_an_upper_bound(tmp_path):
    for job, (selector, acc) in enumerate([("none", 40.0), ("oracle", 99.0), ("glsim", 80.0)]):
        write_run(tmp_path / str(job), selector, 1, acc, "synth_parts")
    table = build_table([read_run_dir(p) for p in run_dirs([str(tmp_path)])], ["selector"], ["dataset"])
    md = render(table, "md")
    assert "| oracle (upper bound) | 99.00 (1) |" in md  # a bound, never the column's best
    assert "| glsim | **80.00 (1)** |" in md
    assert "oracle: the ground-truth box as the crop" in md
    assert json.loads(render(table, "json"))["cells"][1]["row"] == ["oracle"]  # machine-readable: the plain name


def test_keys_added_since_a_run_was_made_count_as_their_defaults(tmp_path):
    """A run from before backbone.freeze and data.augment.mixup existed averages with one that states
    them at their defaults; one that sets another value is kept apart."""
    old = write_run(tmp_path / "old", seed=1, acc=90.0)
    new = write_run(tmp_path / "new", seed=2, acc=91.0, config={"backbone.freeze": False, "data.augment.mixup": 0.0})
    table = build_table([read_run_dir(old), read_run_dir(new)], rows=["selector"], cols=["dataset"])
    assert table.varied == [] and [c.n for c in table.cells.values()] == [2]
    frozen = write_run(tmp_path / "frozen", seed=3, acc=80.0, config={"backbone.freeze": True})
    table = build_table([read_run_dir(r) for r in (old, new, frozen)], rows=["selector"], cols=["dataset"])
    assert table.varied == ["backbone.freeze"]
