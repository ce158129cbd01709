"""No host-device sync in a training step: the trainer's own step (Session.step: forward, backward,
clipping, optimiser, schedule, EMA) of every selector, texture branch, head, method and step option
runs under `NoSync`, a guard that fails on every op that, on a GPU, makes the host wait for the
device or copies host data to it, naming the op and the line of fgvr that called it.

On a CPU every tensor is on the host, so the guard judges ops, not devices:
- reads of a value on the host: `aten._local_scalar_dense` (`.item()`, `float()`, `int()`, `bool()`,
  `if tensor:`), `aten.equal`, and `.tolist()`, `.numpy()`, `.cpu()` (seen as the Python calls they
  are: a CPU tensor's dispatches nothing);
- ops whose output size depends on the data (their CUDA kernels count on the host first): `nonzero`,
  `masked_select`, `unique*`, `bincount`, `repeat_interleave` without `output_size`, indexing with a
  boolean mask; `multinomial`, which checks its input on the host;
- tensors made from host data (`torch.tensor`, `new_tensor`, `as_tensor`, `from_numpy`; all of them
  `aten.lift_fresh`): on a GPU each is a blocking host-to-device copy. A Python scalar that only
  `fill_`s a tensor (`t[:, 0] = True`) is read on the host and copies nothing, so it passes.
Two things pass that only look like syncs here: the optimiser's step counters, which torch keeps on
the host by design when the optimiser is neither fused nor capturable (fgvr's CUDA optimiser is
fused: they are on the device there), and the counter increment torch makes for them. Copies
(`aten._to_copy`, `copy_`) are not judged: the batch's move onto the device is one the step needs
(asynchronous, from pinned memory), and here a copy cannot be told from a cast or a no-op; host
data reaching the device is caught where it is made.

The guard runs on the second step: the first makes what a run makes once (the optimiser's state,
caches), and a sync in the step's code is in every step, the second included."""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fgvr
from fgvr.engine.evaluate import evaluate
from fgvr.engine.session import Session
from fgvr.models import selectors
from fgvr.models.heads import LinearHead
from tests.conftest import TINY

FGVR = Path(fgvr.__file__).parent
TORCH = Path(torch.__file__).parent
HERE = __file__  # as its frames name it

WHY = {  # op -> why it is a sync on a GPU
    "_local_scalar_dense": ".item(), float(), int(), bool(), `if tensor:`: the host waits for the value",
    "item": "the host waits for the value",  # item and is_nonzero reach torch 2.14 as _local_scalar_dense
    "is_nonzero": "bool(tensor): the host waits for the value",
    "equal": "returns a Python bool: the host waits for it",
    "nonzero": "its output size is the data's: the host waits for the count",
    "masked_select": "its output size is the data's: the host waits for the count",
    "bincount": "its output size is the data's maximum: the host waits for it",
    "multinomial": "checks its input on the host",
    "lift_fresh": "a tensor made from host data (torch.tensor, new_tensor, as_tensor): a host-to-device copy",
    "lift_fresh_copy": "a tensor made from host data: a host-to-device copy",
}
BOOL_INDEX = ("index", "index_put", "index_put_", "_index_put_impl_")  # a boolean mask index runs nonzero
GUARD_FRAMES = ("_where", "record", "__torch_dispatch__", "__torch_function__")
HOST_READS = {"tolist": "copies the tensor to the host", "numpy": "copies the tensor to the host",
              "cpu": "copies the tensor to the host"}


def _is_sync(name: str, args: tuple, kwargs: dict) -> str | None:
    """Why the op is a sync on a GPU, or None."""
    if name in WHY:
        return WHY[name]
    if name.startswith(("unique", "_unique")):
        return "its output size is the data's: the host waits for the count"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:  # the repeats as a tensor
        return "repeats given as a tensor without output_size: the host waits for their sum"
    if name in BOOL_INDEX and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                  for i in args[1]):
        return "indexing with a boolean mask runs nonzero: the host waits for the count"
    return None


def _where() -> str:
    """The caller: the innermost frame outside torch (and this guard), and the innermost one in fgvr/
    if that is another."""
    frames = [f for f in traceback.extract_stack() if not f.filename.startswith(str(TORCH))
              and not (f.filename == HERE and f.name in GUARD_FRAMES)]

    def show(f: traceback.FrameSummary) -> str:
        path = Path(f.filename)
        shown = path.relative_to(FGVR.parent) if path.is_relative_to(FGVR.parent) else path
        return f"{shown}:{f.lineno} in {f.name}: `{f.line}`"

    inner = frames[-1]
    ours = next((f for f in reversed(frames) if Path(f.filename).is_relative_to(FGVR)), None)
    return show(inner) + (f", called from {show(ours)}" if ours is not None and ours is not inner else "")


class _HostReads(TorchFunctionMode):
    """The Python calls that copy a tensor to the host: on a CPU they dispatch nothing."""

    def __init__(self, guard: NoSync):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and args and isinstance(args[0], torch.Tensor):
            self.guard.record(f"Tensor.{name}", HOST_READS[name])
        return func(*args, **(kwargs or {}))


class NoSync(TorchDispatchMode):
    """Records every op that would be a host-device sync on a GPU (see the module's docstring); on
    exit, fails naming each (op, why, where) unless `collect`, in which case `found` holds them.
    `optimizer`: its step counters kept on the host by design may be read (see `host_counters`)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None, collect: bool = False):
        super().__init__()
        self.counters = host_counters(optimizer) if optimizer is not None else set()
        self.collect = collect
        self.found: Counter[str] = Counter()
        self.scalars: dict[int, tuple[torch.Tensor, str]] = {}  # Python scalars lifted, not yet used
        self.host_reads = _HostReads(self)

    def record(self, op: str, why: str, where: str | None = None) -> None:
        self.found[f"{op} ({why}) at {where or _where()}"] += 1

    def __enter__(self):
        self.host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.host_reads.__exit__(*exc)
        for _, where in self.scalars.values():  # made from host data and kept
            self.record("aten.lift_fresh", WHY["lift_fresh"], where)
        self.scalars.clear()
        if self.found and not self.collect and exc[0] is None:
            raise AssertionError("host-device syncs in the step:\n" + "\n".join(self.found))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        lifted = [t for t in tensors if id(t) in self.scalars]
        if lifted:
            counters = [t for t in tensors if id(t) not in self.scalars]  # the op's other tensors
            on_counters = bool(counters) and all(t.data_ptr() in self.counters for t in counters)
            fills = name == "fill_" and len(args) > 1 and args[1] is lifted[0]
            for t in lifted:
                _, where = self.scalars.pop(id(t))
                if not (fills or on_counters):
                    self.record("aten.lift_fresh", WHY["lift_fresh"], where)
        out = func(*args, **kwargs)
        if name in ("lift_fresh", "lift_fresh_copy") and out.ndim == 0:  # judged by its use: a fill_ is fine
            self.scalars[id(out)] = out, _where()
            return out
        if name == "_local_scalar_dense" and args[0].data_ptr() in self.counters:
            return out
        why = _is_sync(name, args, kwargs)
        if why is not None:
            self.record(f"aten.{name}", why)
        return out


def host_counters(optimizer: torch.optim.Optimizer) -> set[int]:
    """The data pointers of the step counters torch's optimiser keeps on the host by design (a group
    neither fused nor capturable keeps them as CPU tensors and reads them with .item())."""
    return {state["step"].data_ptr() for group in optimizer.param_groups
            if not group.get("fused") and not group.get("capturable")
            for p in group["params"] if "step" in (state := optimizer.state.get(p, {}))
            and isinstance(state["step"], torch.Tensor) and state["step"].device.type == "cpu"}


# --- The guard itself: it passes what is no sync and fails on each kind of sync ---------------------------------

V = torch.arange(6.0)
PLANTED = {  # a sync of each kind, and the op the guard must name
    "item": (lambda: V.sum().item(), "aten._local_scalar_dense"),
    "float": (lambda: float(V.max()), "aten._local_scalar_dense"),
    "if tensor": (lambda: 1 if (V > 2).any() else 0, "aten._local_scalar_dense"),
    "tolist": (lambda: V.tolist(), "Tensor.tolist"),
    "cpu": (lambda: V.cpu(), "Tensor.cpu"),
    "new_tensor": (lambda: V * V.new_tensor([1, 2, 3, 4, 5, 6]), "aten.lift_fresh"),
    "torch.tensor scalar": (lambda: V + torch.tensor(2.0), "aten.lift_fresh"),
    "mask index": (lambda: V[V > 2], "aten.index"),
    "mask assign": (lambda: V.clone().__setitem__(V > 2, V[:3]), "aten.index_put_"),
    "nonzero": (lambda: (V > 2).nonzero(), "aten.nonzero"),
    "where(cond)": (lambda: torch.where(V > 2), "aten.nonzero"),
    "unique": (lambda: V.unique(), "aten._unique2"),
    "repeat_interleave": (lambda: V.repeat_interleave(torch.ones(6, dtype=torch.long)), "aten.repeat_interleave"),
    "multinomial": (lambda: torch.multinomial(V + 1, 2), "aten.multinomial"),
}


@pytest.mark.parametrize("plant", PLANTED)
def test_the_guard_fails_on_each_kind_of_sync_and_names_it(plant):
    fn, op = PLANTED[plant]
    with pytest.raises(AssertionError, match="host-device syncs in the step") as failure:
        with NoSync():
            fn()
    message = str(failure.value)
    assert op in message and "tests/engine/test_no_sync.py" in message and "lambda" in message, message


def test_the_guard_passes_what_is_no_sync():
    """Sync-free equivalents of the planted ops pass: a Python scalar that fills a slice, scalars in
    arithmetic and torch.where, integer indexing, nonzero_static, repeat_interleave with its size."""
    with NoSync():
        keep = V > 2
        keep[:2] = True
        y = torch.where(keep, V * 2 + 1, 0)[torch.arange(3)]
        (V > 2).nonzero_static(size=6)
        V.repeat_interleave(torch.ones(6, dtype=torch.long), output_size=6)
        y.topk(2).indices.float().mean()


def test_only_the_optimizers_own_host_counters_may_be_read():
    """AdamW (foreach, not fused) keeps its step counters on the host and reads them with .item():
    allowed for exactly those tensors; the same read of another host scalar fails."""
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([w], foreach=True)
    w.grad = torch.ones(3)
    optimizer.step()  # makes the state, counters included
    with NoSync(optimizer):
        optimizer.step()
    other = torch.zeros(())
    with pytest.raises(AssertionError, match="aten._local_scalar_dense"):
        with NoSync(optimizer):
            other.item()


# --- Every configuration's training step --------------------------------------------------------------------------

BASE = [*TINY, "data.batch_size=4"]  # TINY's data set (made once per test session), 4 images a batch
GABOR = ["texture=gabor", "texture.region_size=16"]
CASES = {
    "selector=none": [],
    "selector=glsim": ["selector=glsim"],
    "selector=rollout": ["selector=rollout"],
    "selector=random": ["selector=random"],
    "selector=center": ["selector=center"],
    "selector=oracle": ["selector=oracle"],
    "selector=glsim, every crop option": ["selector=glsim", "selector.metric=l2", "selector.box_end=exclusive",
                                          "selector.crop_source=original", "selector.crop_size=24",
                                          "selector.crop_cls=shared", "selector.align_corners=true"],
    "texture=gabor": GABOR,
    "texture=gabor regions=glsim": [*GABOR, "selector=glsim", "texture.regions=glsim"],
    "texture=gabor gate=ste": [*GABOR, "texture.gate=ste"],
    "texture=gabor fusion=token head=aggregator": [*GABOR, "texture.fusion=token", "selector=glsim",
                                                   "head=aggregator"],
    "texture=gabor, other options": [*GABOR, "texture.channels=rgb", "texture.crop_source=original",
                                     "texture.learnable=false", "texture.learnable_histogram=false",
                                     "texture.split_bands=false"],
    "head=aggregator": ["head=aggregator"],
    "CNN selector=glsim texture=gabor": ["backbone=resnet_micro", "selector=glsim", *GABOR],
    "method=transfg": ["method=transfg", "method.overlap_stride=4"],
    "method=ffvt": ["method=ffvt"],
    "method=ielt": ["method=ielt", "method.update_warm=0"],
    "method=cal": ["method=cal", "backbone=resnet_micro", "method.tta=true"],  # tta: the evaluation forward
    "ema accum_steps=2 grad_clip": ["selector=glsim", "trainer.ema_decay=0.9", "trainer.accum_steps=2",
                                    "trainer.grad_clip=1.0"],
    "precision=bf16": ["trainer.precision=bf16", "selector=glsim", *GABOR, "trainer.grad_clip=1.0"],
    "precision=bf16 method=ielt": ["trainer.precision=bf16", "method=ielt"],
    "optim=sgd": ["optim=sgd", "selector=glsim"],
    "mixup cutmix": ["data.augment.mixup=0.8", "data.augment.cutmix=1.0", "selector=glsim",
                     "trainer.label_smoothing=0.1"],
    "cutmix method=transfg": ["data.augment.cutmix=1.0", "method=transfg"],
    "mixup method=ielt": ["data.augment.mixup=0.8", "method=ielt", "method.update_warm=0"],
    "backbone.freeze selector=glsim": ["backbone.freeze=true", "selector=glsim"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def session(compose):
    """A Session on a composed config, on the CPU, and its first step (the warm-up)."""
    sessions = []

    def _session(*overrides: str) -> tuple[Session, list]:
        s = Session(compose(*BASE, *overrides), torch.device("cpu"))
        sessions.append(s)
        steps = s.epoch(0)
        s.step(next(steps))
        return s, next(steps)

    yield _session
    for s in sessions:
        s.loaders.close()


@pytest.mark.parametrize("case", CASES)
def test_a_training_step_makes_no_host_device_sync(session, case):
    """The step after the warm-up, under the guard; then the evaluation forward of the weights the
    run reports (CAL's test-time crops, the EMA copy), which evaluation repeats each batch."""
    s, batches = session(*CASES[case])
    with NoSync(s.optimizer):
        s.step(batches)
    model = s.eval_model.eval()
    with torch.no_grad(), s.autocast(), NoSync():
        model(batches[0].images, batches[0].boxes)


def test_a_planted_sync_in_the_step_fails_it(session, monkeypatch):
    """The guard covers the real step: an .item() in the head's forward, or the size tensor
    topk_boxes once built, each fails the step and is named at its line."""
    s, batches = session("selector=glsim")
    forward = LinearHead.forward
    monkeypatch.setattr(LinearHead, "forward", lambda self, *feats: forward(self, *feats) * (feats[0].sum().item() > 0))
    with pytest.raises(AssertionError, match=r"aten._local_scalar_dense .* at tests/engine/test_no_sync.py:\d+ "
                                             r"in <lambda>.*, called from fgvr/models/model.py:\d+ in classify"):
        with NoSync(s.optimizer):
            s.step(batches)
    monkeypatch.setattr(LinearHead, "forward", forward)

    def clip_with_a_host_tensor(boxes, image_hw):
        return torch.minimum(boxes, boxes.new_tensor([image_hw[1], image_hw[0]] * 2))

    monkeypatch.setattr(selectors, "clip_boxes", clip_with_a_host_tensor)
    with pytest.raises(AssertionError, match=r"aten.lift_fresh .* at tests/engine/test_no_sync.py:\d+ in "
                                             r"clip_with_a_host_tensor.*called from fgvr/models/selectors.py"):
        with NoSync(s.optimizer):
            s.step(batches)


def test_evaluation_syncs_once_not_per_batch(session):
    """engine/evaluate.py reads its totals once at the end (the images counted on the host, the
    all-reduced sums as a list), not per batch: the same syncs for one batch as for three."""
    s, _ = session("selector=glsim", *GABOR, "data.eval_batch_size=4")
    batches = list(s.loaders.test)[:3]
    found = []
    for n in (1, 3):
        with NoSync(collect=True) as guard:
            evaluate(s.eval_model, batches[:n], s.device, s.amp)
        found.append(guard.found)
    assert found[0] == found[1] and sum(found[0].values()) == 2, found
    assert all("fgvr/engine/evaluate.py" in where for where in found[0]), found
