"""`fgvr table` counts each seed once: runs that agree on every setting and the seed (a relaunch
into a new dir, or the same run on W&B twice) are one seed, the one that ended last."""

import json
import os
from types import SimpleNamespace

from fgvr.cli import main
from fgvr.commands.table import build_table, read_run_dir, render, run_dirs
from fgvr.commands.wandb_runs import to_record
from tests.commands.test_table import write_run


def ended_at(run_dir, when: float):
    os.utime(run_dir / "results.json", (when, when))
    return run_dir


def test_a_relaunch_of_the_same_seed_is_not_a_second_seed(tmp_path, capsys):
    ended_at(write_run(tmp_path / "first", seed=0, acc=80.0), 1_000_000)
    ended_at(write_run(tmp_path / "again", seed=0, acc=90.0, config={"data.root": "/moved"}), 2_000_000)
    ended_at(write_run(tmp_path / "other", seed=1, acc=70.0), 1_500_000)  # a real second seed
    table = build_table([read_run_dir(d) for d in run_dirs([str(tmp_path)])], ["selector"], ["dataset"])
    cell = table.cells[(("glsim",), ("cub",))]
    assert (cell.n, cell.mean) == (2, 80.0)  # the relaunch (90) and seed 1 (70); the older seed 0 left out
    assert [(r.seed, r.kept, r.left_out) for r in table.repeats] == [(0, str(tmp_path / "again"),
                                                                      [str(tmp_path / "first")])]
    main(["table", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| glsim | 80.00 ± 14.14 (2) |" in out
    assert (f"note: 1 run repeats seed 0 of glsim (cub): kept {tmp_path / 'again'} (it ended last), "
            f"left out {tmp_path / 'first'}") in out.splitlines()
    main(["table", str(tmp_path), "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["repeats"] == [{"row": ["glsim"], "col": ["cub"], "seed": 0, "kept": str(tmp_path / "again"),
                               "left_out": [str(tmp_path / "first")]}]


def test_the_newest_run_is_kept_whatever_the_order_and_other_cells_are_untouched(tmp_path):
    ended_at(write_run(tmp_path / "a", seed=3, acc=91.0), 3_000_000)  # newest, listed first
    ended_at(write_run(tmp_path / "b", seed=3, acc=85.0), 2_000_000)
    ended_at(write_run(tmp_path / "c", seed=3, acc=86.0), 1_000_000)
    ended_at(write_run(tmp_path / "d", seed=3, acc=50.0, dataset="dogs"), 1_000_000)  # another cell
    ended_at(write_run(tmp_path / "e", seed=3, acc=60.0, config={"optim.lr": 0.1}), 1_000_000)  # another setting
    table = build_table([read_run_dir(d) for d in run_dirs([str(tmp_path)])], ["selector"], ["dataset"])
    assert table.cells[(("glsim", 0.01), ("cub",))].mean == 91.0 and table.cells[(("glsim", 0.01), ("cub",))].n == 1
    assert table.cells[(("glsim", 0.01), ("dogs",))].n == 1 and table.cells[(("glsim", 0.1), ("cub",))].n == 1
    (repeat,) = table.repeats
    assert repeat.kept.endswith("/a") and [p.rsplit("/", 1)[1] for p in repeat.left_out] == ["b", "c"]
    assert "note: 2 runs repeat seed 3 of glsim / 0.01 (cub): kept" in render(table, "md")


def wandb_run(run_id: str, seed: int, acc: float, heartbeat: str) -> SimpleNamespace:
    config = {"seed": seed, "data": {"name": "cub", "img_size": 224}, "optim": {"lr": 0.01}}
    summary = {"status": "finished", "dataset": "cub", "selector": "glsim", "texture": "none", "head": "linear",
               "backbone_config": "vit_b16", "seed": seed, "test_acc": acc, "_timestamp": 1.0}
    return SimpleNamespace(url=f"https://wandb.ai/lab/fgvr/runs/{run_id}", name=run_id, state="finished",
                           config=config, summary_metrics=summary, heartbeat_at=heartbeat)


def test_wandb_runs_of_the_same_seed_count_once_the_last_to_end_kept():
    runs = [wandb_run("late", 1, 90.0, "2026-12-02T09:00:00Z"), wandb_run("early", 1, 80.0, "2026-12-01T10:00:59Z"),
            wandb_run("seed2", 2, 70.0, "2026-12-01T11:00:00Z")]
    records = [to_record(r) for r in runs]
    table = build_table(records, ["selector"], ["dataset"])
    assert table.cells[(("glsim",), ("cub",))].mean == 80.0 and table.cells[(("glsim",), ("cub",))].n == 2
    assert records[1].ended == 1796119259.0  # 2026-12-01T10:00:59Z
    (repeat,) = table.repeats
    assert repeat.kept.endswith("/late (late)") and repeat.left_out == ["https://wandb.ai/lab/fgvr/runs/early (early)"]
