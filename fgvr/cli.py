"""`fgvr <command> [overrides]`: dispatch to the Hydra app (or plain command) behind each command.

Heavy imports (torch, timm, wandb) happen inside the commands, so `fgvr --help` answers at once.
Errors a user can cause end in one line on stderr: exit code 2 for a bad config or override,
1 for bad data or files. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys

from fgvr.runtime.errors import FgvrError, RunInterrupted, first_line

USAGE = """\
usage: fgvr <command> [hydra overrides] [--help]

commands:
  train   train (or resume) a run composed from configs/  e.g. fgvr train +experiment=cub data.root=DIR
          a sweep: fgvr train --multirun seed=1,10,100 [hydra/launcher=slurm]; DDP: trainer.devices=4
  eval    re-evaluate a checkpoint on the test split        e.g. fgvr eval ckpt=outputs/<date>/<run dir>
  viz     draw heat maps, boxes and crops for n images      e.g. fgvr viz ckpt=outputs/<date>/<run dir> n=16
  bench   time training and eval steps of a composed run   e.g. fgvr bench selector=glsim bench.out=bench.json
          (img/s of the whole loop and of the model alone, ms per step by phase, peak memory, MFU)
  predict top-k classes and regions for new images       e.g. fgvr predict ckpt=<run dir> input=photos/ out=preds.csv
  export  the whole model as ONNX, TorchScript or .pt2     e.g. fgvr export ckpt=<run dir> format=onnx
  data    the benchmarks: list, download, check, stats      e.g. fgvr data download cub --root ~/data
  table   mean ± std over seeds from run dirs or sweeps     e.g. fgvr table outputs/multirun/2026-11-22/10-00-00

`fgvr <command> --help` lists the config groups and the composed config;
`fgvr train --cfg job` prints the config without running.
"""

COMMANDS = ("train", "eval", "viz", "predict", "export", "bench", "data", "table")
log = logging.getLogger("fgvr")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from fgvr import __version__

        print(f"fgvr {__version__}")
        return
    if command not in COMMANDS:
        print(f"fgvr: unknown command {command!r}; choose one of {', '.join(COMMANDS)} (fgvr --help)", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if command in ("data", "table"):  # plain commands, no Hydra run
        _report_user_errors(command, _plain_command(command), rest)
        return
    # Hydra then lets exceptions through instead of printing a trimmed traceback itself, so
    # that user errors can be reported here in one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    multirun = any(a in ("-m", "--multirun") for a in rest)
    if command == "train" and not multirun:
        _check_shared_run_dir(rest)
    sys.argv = [f"fgvr {command}", *rest]
    try:
        _hydra_app(command)()
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print(f"fgvr {command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if multirun:
            _sweep_summary(failure=e)
        _exit_on_user_error(command, e)
        raise
    if multirun and command == "train":
        _sweep_summary()


def _check_shared_run_dir(args: list[str]) -> None:
    """Ranks started by torchrun or srun each compose the config: a run dir from the clock would
    differ between them, so they must be given one."""
    ranks = int(os.environ.get("WORLD_SIZE", "1")) * int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if ranks > 1 and not any(a.startswith("hydra.run.dir=") for a in args):
        print("fgvr train: error: this is one of several processes (torchrun or srun); pass hydra.run.dir=DIR "
              "so that all of them share one run dir", file=sys.stderr)
        sys.exit(2)


def _sweep_summary(failure: Exception | None = None) -> None:
    """After a multirun: exit 1 if a run failed. If the launcher itself gave up on a job (a SLURM
    job killed before it could report), print the sweep's summary, which Hydra then skips."""
    from fgvr.commands.sweep import SweepSummary, format_summary, sweep_runs

    sweep_dir = SweepSummary.last_sweep_dir
    if sweep_dir is None or not sweep_dir.is_dir():
        return
    runs = sweep_runs(sweep_dir)
    if failure is not None:
        print(format_summary(sweep_dir, runs), file=sys.stderr)
        return
    unfinished = [r for r in runs if r.status != "finished"]
    if unfinished:
        print(f"fgvr train: error: {len(unfinished)} of {len(runs)} runs did not finish (listed above), e.g. "
              f"{unfinished[0].dir}", file=sys.stderr)
        sys.exit(1)


def _exit_on_user_error(command: str, e: Exception) -> None:
    """Print a user error in one line and exit; return if `e` is a bug (its traceback then shows)."""
    message, code = user_error(e, command)
    if message is not None:
        print(f"fgvr {command}: error: {message}", file=sys.stderr)
        sys.exit(code)


def _hydra_app(command: str):
    import hydra

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas(bench=command == "bench")
    task = {"train": _train_task, "eval": _eval_task, "viz": _viz_task, "predict": _predict_task,
            "export": _export_task, "bench": _bench_task}[command]
    return hydra.main(config_path=str(config_dir()), config_name=command, version_base="1.3")(task)


def _train_task(cfg) -> float | None:
    """Train one run; returns its best_val_acc, the objective a sweeper (hydra/sweeper=optuna) maximises."""
    from fgvr.engine.trainer import train
    from fgvr.runtime.tracker import run_info

    run, multirun = run_info(cfg.name), _is_multirun()
    try:
        results = train(cfg, run)
    except Exception as e:
        if not multirun:
            _exit_on_user_error("train", e)
            raise
        message, _ = user_error(e, "train")  # a sweep goes on with its other runs; results.json says why
        log.error("run %s failed: %s", run.dir, message or first_line(e, typed=True), exc_info=message is None)
        return None
    if results["status"] == "interrupted":
        log.warning("stopped by %s at step %d; %s/checkpoints/last.pt holds the run: relaunching with this run dir "
                    "resumes it", results["signal"], results["steps"], run.dir)
        # Hand the signal to whoever listened before training: submitit requeues the job (and exits),
        # a plain process ends. If the listener lets the job go on, the run is still unfinished.
        # Ctrl-C (SIGINT) was the user's: it ends here, in one line.
        signum = signal.Signals[results["signal"]]
        if signum is not signal.SIGINT:
            signal.raise_signal(signum)
        error = RunInterrupted(f"{run.dir}: stopped by {results['signal']} at step {results['steps']} before the "
                               "end; relaunch with this run dir to resume it", signum)
        if not multirun:
            _exit_on_user_error("train", error)  # here, or Hydra adds a line of its own
        raise error
    return results["best_val_acc"]



def _eval_task(cfg) -> None:
    from fgvr.commands.eval import evaluate_checkpoint

    _report_user_errors("eval", evaluate_checkpoint, cfg)


def _viz_task(cfg) -> None:
    from fgvr.commands.viz import visualise

    _report_user_errors("viz", visualise, cfg)


def _predict_task(cfg) -> None:
    from fgvr.commands.predict import predict

    _report_user_errors("predict", predict, cfg)


def _export_task(cfg) -> None:
    from fgvr.commands.export import export

    _report_user_errors("export", export, cfg)


def _bench_task(cfg) -> None:
    from fgvr.engine.bench import bench
    from fgvr.runtime.rundir import RunDir
    from fgvr.runtime.tracker import run_info, write_json

    def measure(cfg) -> None:  # the numbers go to <run dir>/bench.json (and to bench.out if given)
        run = run_info(cfg.name)
        write_json(RunDir(run.dir).bench, bench(cfg, run.choices))

    _report_user_errors("bench", measure, cfg)


def _plain_command(command: str):
    if command == "data":
        from fgvr.commands.data import main
    else:
        from fgvr.commands.table import main
    return main


def _report_user_errors(command: str, fn, cfg) -> None:
    try:
        fn(cfg)
    except Exception as e:
        _exit_on_user_error(command, e)
        raise


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def user_error(e: BaseException, command: str) -> tuple[str | None, int]:
    """(one-line message, exit code) for an error the user can fix, or (None, 0) for a bug."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, FgvrError):
        return str(e), e.exit_code
    if isinstance(e, OSError) and e.filename and (
            isinstance(e, (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError))
            or e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)):
        return f"{e.filename}: {e.strerror}", 1  # e.g. hydra.run.dir or out= on a read-only or full disk
    if type(e).__module__.startswith("submitit."):  # the launcher gave up on a SLURM (or local) job
        return _job_error(str(e)), 1
    if isinstance(e, ValueError) and str(e) == "No trials are completed yet." and _raised_in(e, "optuna"):
        return "every trial of the Optuna study failed (the sweep's runs are listed above)", 1
    if isinstance(e, MissingConfigException):
        return _missing_option(e), 2
    if isinstance(e, OverrideParseException):
        return f"{first_line(e)} (overrides look like key=value, +key=value or group=option)", 2
    if isinstance(e, ConfigCompositionException) and isinstance(e.__cause__, OmegaConfBaseException):
        e = e.__cause__
    if isinstance(e, OmegaConfBaseException):
        return _omegaconf_error(e, command), 2
    if isinstance(e, ConfigCompositionException):
        return first_line(e), 2
    if isinstance(e, AssertionError) and "Unexpected type for root: NoneType" in str(e):
        # OmegaConf asserts instead of raising when an override reaches into a null section.
        return ("an override sets a key inside a section that is null in this config (e.g. data.synth.* with "
                "data=cub); drop it or pick the option that has that section (fgvr train --cfg job shows them)"), 2
    return None, 0


def _raised_in(e: BaseException, package: str) -> bool:
    """Whether `e` was raised by code of `package`."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"/{package}/" in tb.tb_frame.f_code.co_filename


def _job_error(message: str) -> str:
    """submitit's report of a failed job (the job's traceback or error stream, many lines) as
    'SLURM job 12_1 failed (state: FAILED): <its last error line>; logs: <where they are>'."""
    job = re.search(r"\.submitit/([^/\s]+)/", message)
    state = re.search(r"\(state: (\w+)\)", message)
    logs = re.search(r"(\S+/\.submitit/[^/\s]+)/", message)
    parts = re.split(r"\n-{10,}\n", message)  # the job's traceback or error stream sits between dashed lines
    body = parts[1].strip().splitlines() if len(parts) > 1 else []
    last = body[-1].strip() if body else first_line(message)
    return (f"SLURM job {job.group(1) if job else '?'} failed{f' (state: {state.group(1)})' if state else ''}: "
            f"{last}{f'; logs: {logs.group(1)}' if logs else ''}")


def _missing_option(e) -> str:
    """'backbone=foo: no such option; choose one of ...' from Hydra's MissingConfigException."""
    from fgvr.runtime.config import config_dir

    match = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", str(e))
    if not match:
        return first_line(e)
    group, option = match.groups()
    options = sorted(e.options or (p.stem for p in (config_dir() / group).glob("*.yaml")))
    add = "+" if group == "experiment" else ""
    return f"{add}{group}={option}: no such option; choose one of {', '.join(options)}"


def _omegaconf_error(e, command: str) -> str:
    """A missing value, a wrong key or a wrong type, with the key's full name and what it accepts."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue

    key = getattr(e, "full_key", None) or ""
    msg = first_line(e)
    if isinstance(e, MissingMandatoryValue):
        return f"{key} is required: pass {key}=..."
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rpartition(".")[0]
        valid = _schema_keys(command, parent)
        hint = f"; valid keys{' under ' + parent if parent else ''}: {', '.join(valid)}" if valid else ""
        return f"{key or msg}: no such config key{hint}"
    enum = re.search(r"Invalid value '([^']*)', expected one of \[([^\]]*)\]", msg)
    if enum:
        return f"{key}={enum.group(1)}: choose one of {enum.group(2).replace(chr(39), '')}"
    return f"{key}: {msg}" if key else msg


def _schema_keys(command: str, parent: str) -> list[str]:
    """The keys the command's schema (fgvr/runtime/config.py) allows under a dotted path; [] if it is free-form."""
    import dataclasses
    import typing

    from fgvr.runtime.config import BenchConfig, EvalConfig, ExportConfig, PredictConfig, TrainConfig, VizConfig

    node = {"train": TrainConfig, "eval": EvalConfig, "viz": VizConfig, "predict": PredictConfig,
            "export": ExportConfig, "bench": BenchConfig}[command]
    for part in filter(None, parent.split(".")):
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


if __name__ == "__main__":
    main()
