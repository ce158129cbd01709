"""Several processes, one run (DDP). Where ranks come from:

- torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
- a SLURM step with several tasks (`hydra.launcher.tasks_per_node=4`), read through submitit;
- `trainer.devices=N` on one machine: fgvr starts the N worker processes itself (`spawn`).

Batch size is per process: a step sees `data.batch_size x world size x trainer.accum_steps`
images (`optim.lr_scale` can scale the learning rate for that). Rank 0 alone logs and writes
the run's files; metrics are summed over all ranks, so accuracy is over the whole split.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from fgvr.runtime.errors import ConfigError, FgvrError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The ranks the environment gives this process; one process if it gives none.

    A SLURM step with several tasks (or a submitit local job with several) is read with
    submitit's TorchDistributedEnvironment, which also exports MASTER_ADDR/MASTER_PORT (the
    first node, a port derived from the job id)."""
    env = os.environ
    if "WORLD_SIZE" not in env and _job_tasks() > 1:
        from submitit.helpers import TorchDistributedEnvironment

        env.setdefault("SUBMITIT_EXECUTOR", "slurm")  # srun without submitit: the same variables
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if "WORLD_SIZE" not in env:
        return Dist()
    return Dist(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))


def _job_tasks() -> int:
    """Tasks of the SLURM step (or submitit local job) this process is one of."""
    return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or 1)


def cpus_per_process() -> int:
    """The CPUs this process may use: its own set if something pinned it (SLURM's task affinity,
    taskset), else its share of the machine's among the ranks on it."""
    pinned = len(os.sched_getaffinity(0))
    total = os.cpu_count() or 1
    return pinned if pinned < total else max(1, total // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); the device this rank trains on."""
    if not dist.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores
        torch.set_num_threads(cpus_per_process())
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank,
                                      world_size=dist.world_size, device_id=device if device.type == "cuda" else None)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum a tensor over ranks, in place."""
    if dist.enabled:
        torch_dist.all_reduce(tensor)
    return tensor


def gather(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


class AnyRank:
    """`any_rank(flag)`: True once any rank has passed True, agreed by all ranks at the same call.

    The flags travel over a CPU (gloo) group asynchronously and are read one call later, so the
    check costs no device sync and never blocks a step; ranks may learn of a stop one step late."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.group = torch_dist.new_group(backend="gloo") if dist.enabled else None
        self.pending: tuple[torch.Tensor, object] | None = None

    def __call__(self, flag: bool) -> bool:
        if not self.dist.enabled:
            return flag
        decided = False
        if self.pending is not None:
            value, work = self.pending
            work.wait()
            decided = bool(value.item())
        value = torch.tensor([int(flag)])
        self.pending = (value, torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=self.group,
                                                     async_op=True))
        return decided


def quiet_logging(dist: Dist) -> None:
    """Ranks other than 0 log warnings only, to the console, marked with their rank."""
    if dist.is_main:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {dist.rank}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, nprocs: int, port: int, logging_config: dict | None, fn, args) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                   "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nprocs), "LOCAL_WORLD_SIZE": str(nprocs)}
    if local_rank == 0 and logging_config:
        logging.config.dictConfig(logging_config)  # the parent's console; _train adds train.log
    quiet_logging(Dist(local_rank, local_rank, nprocs))
    try:
        fn(*args)
    except FgvrError as e:  # a user error gets its one line here; the parent only reports the exit code
        print(f"fgvr train: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


class WorkerFailed(FgvrError):
    """A worker of `launch_local` failed; its own error was printed before."""


def launch_local(fn, args: tuple, nprocs: int, logging_config: dict | None = None) -> None:
    """Run `fn(*args)` in `nprocs` new processes that form one process group on this machine.

    SIGTERM and SIGUSR2 sent to this process are passed on to the workers, which save and stop
    at their next step; Ctrl-C reaches them from the terminal (their process group) and is left to
    them. Raises WorkerFailed if a worker fails or dies."""
    import torch.multiprocessing as mp

    ranks = int(os.environ.get("WORLD_SIZE", "1")) * _job_tasks()
    if ranks > 1:
        raise ConfigError(f"trainer.devices={nprocs}: this process is already one of {ranks} ranks (torchrun or "
                          "several SLURM tasks); leave trainer.devices=1 there")
    context = mp.start_processes(_worker, args=(nprocs, _free_port(), logging_config, fn, args), nprocs=nprocs,
                                 join=False, start_method="spawn")

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR2)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers itself
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        raise WorkerFailed(f"trainer.devices={nprocs}: worker {e.error_index} exited with code {e.exit_code}"
                           f"{' (' + e.signal_name + ')' if e.signal_name else ''}") from None
    except mp.ProcessRaisedException as e:
        raise WorkerFailed(f"trainer.devices={nprocs}: worker {e.error_index} failed: {e}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
