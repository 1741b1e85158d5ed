"""Running under torchrun: this process's place in the job, and the few collectives loracls needs.

    torchrun --nproc_per_node 4 -m loracls train ...          # one host, 4 GPUs (or 4 CPU processes)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m loracls train ...

Outside torchrun (no WORLD_SIZE in the environment) `world()` is a single process and every method below is a
no-op, so the training loop and prediction code read the same either way.

Under torchrun: the process group is NCCL on CUDA and gloo on the CPU, each rank on its own device
(cuda:LOCAL_RANK), with a timeout on every collective (LORACLS_DIST_TIMEOUT seconds, default 300) so that a rank
that dies makes the others fail with a message instead of hanging.  Every global batch is split across the
ranks; gradients are averaged by DistributedDataParallel, whose bucketed all-reduce overlaps the backward pass
(only the trainable LoRA and head tensors take part: a few MB).  Evaluation shards the examples and gathers the
probabilities, so metrics equal a single process's.  Rank 0 alone writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loracls.errors import LoraclsError, first_line, machine_error_message


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, name: str) -> str:
        """The device name for this rank: cuda means this rank's own GPU."""
        if self.distributed and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            lower, upper = batch_size - batch_size % self.size, batch_size + self.size - batch_size % self.size
            options = " or ".join(str(b) for b in (lower, upper) if b > 0)
            raise LoraclsError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                               f"{self.size} processes; use a multiple of {self.size}, e.g. {options}")

    def shard(self, idx: list[int]) -> tuple[list[int], bool]:
        """This rank's part of a global batch, and whether its loss counts.  A rank left without an example (a
        short last batch) runs the batch's first example with its loss weighted 0 (counts False), since every
        rank must take part in DDP's all-reduce.  The caller weighs the loss by the whole step's examples."""
        part = idx[self.rank::self.size]
        if not part:
            return idx[:1], False
        return part, True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call for training steps: DistributedDataParallel under torchrun (the frozen weights are
        buffers or frozen parameters: nothing to broadcast or reduce), else the model itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model.device.index] if model.device.type == "cuda" else None
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # same on every rank
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    # -- collectives (no-ops in a single process) ---------------------------------------------------------------
    def all_sum(self, *tensors: torch.Tensor) -> None:
        if self.distributed:
            for t in tensors:
                _collective(torch.distributed.all_reduce, t)

    def all_max(self, t: torch.Tensor) -> None:
        if self.distributed:
            _collective(torch.distributed.all_reduce, t, op=torch.distributed.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (an interrupt on one rank stops them all at one step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=_FLAG_DEVICE)
        self.all_max(t)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        _collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def on_main(self, fn, shared=None):
        """fn() computed by rank 0 alone (e.g. what opens, locks and reads a run); the other ranks get its value
        (or `shared(value)`, for a value that cannot travel), or raise its error as a LoraclsError."""
        if not self.distributed:
            return fn()
        value, failure, error = None, None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:  # tell the other ranks too, or they wait for rank 0 until the timeout
                failure, error = e, message_for_other_ranks(e)
        sent = shared(value) if self.is_main and shared is not None and failure is None else value
        received, error = self.broadcast((sent, error))
        if failure is not None:
            raise failure  # rank 0 keeps its own error: a bug keeps its traceback there
        if error is not None:
            raise LoraclsError(error)
        return value if self.is_main else received

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        _collective(torch.distributed.all_gather_object, out, obj)
        return out

    def predict(self, predict_fn, n: int, num_labels: int) -> np.ndarray:
        """Run `predict_fn(indices) -> probs [len, K]` on this rank's share of range(n) and gather all rows, in
        order, on every rank."""
        mine = list(range(self.rank, n, self.size))
        probs = predict_fn(mine) if mine else np.zeros((0, num_labels), dtype=np.float32)
        out = np.zeros((n, num_labels), dtype=np.float32)
        for r, part in enumerate(self.gather(probs)):
            out[r::self.size] = part
        return out


def message_for_other_ranks(e: Exception) -> str:
    """Rank 0's failure as the other ranks report it: a user error or machine fault in its own words."""
    if isinstance(e, LoraclsError):
        return str(e)
    message = machine_error_message(e)  # disk full, read-only, ..., whichever library was writing
    if message is not None:
        return message
    return f"rank 0 failed ({first_line(e)}); see its traceback"


_WORLD: World | None = None
_FLAG_DEVICE = torch.device("cpu")  # the small flags travel by gloo, which every process group here has


def world() -> World:
    """This process's World; the first call under torchrun joins the process group."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _env_int("WORLD_SIZE", "1")
    if size <= 1:
        _WORLD = World()
        return _WORLD
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # where the env:// rendezvous meets
        if not os.environ.get(name):
            raise LoraclsError(f"the environment variable {name} is not set; {_TORCHRUN_FIX}")
    try:
        timeout = datetime.timedelta(seconds=float(os.environ.get("LORACLS_DIST_TIMEOUT", "300")))
    except ValueError:
        raise LoraclsError("LORACLS_DIST_TIMEOUT must be a number of seconds, e.g. 300") from None
    if torch.cuda.is_available():  # NCCL for CUDA tensors, gloo for CPU ones (--device cpu on a GPU machine)
        gpus = torch.cuda.device_count()
        if not 0 <= local_rank < gpus:
            raise LoraclsError(f"LOCAL_RANK {local_rank} names no GPU on this machine ({gpus} visible); start at "
                               f"most {gpus} processes per node (torchrun --nproc_per_node {gpus}), or hide the "
                               "GPUs (CUDA_VISIBLE_DEVICES=) to run CPU processes")
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        torch.distributed.init_process_group(backend, timeout=timeout)
    except ValueError as e:  # a malformed MASTER_PORT, RANK or WORLD_SIZE
        raise LoraclsError(f"cannot join the torchrun job ({first_line(e, 120)}); {_TORCHRUN_FIX}") from None
    except torch.distributed.DistError as e:  # MASTER_ADDR unreachable, or the other processes never came
        raise LoraclsError(f"cannot join the torchrun job at {os.environ.get('MASTER_ADDR')}:"
                           f"{os.environ.get('MASTER_PORT')} ({first_line(e, 100)}); check that every node can "
                           "reach it and that all the job's processes start") from None
    _WORLD = World(rank, size, local_rank)
    return _WORLD


_TORCHRUN_FIX = ("start loracls with torchrun, which sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and "
                 "MASTER_PORT, or unset WORLD_SIZE to run one process")


def _env_int(name: str, default: str | None = None) -> int:
    """An integer that torchrun puts in the environment; a missing or malformed one is a LoraclsError."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        what = "is not set" if value is None else f"is {value!r}, not an integer"
        raise LoraclsError(f"the environment variable {name} {what}; {_TORCHRUN_FIX}") from None


def _collective(fn, *args, **kwargs):
    """A collective whose failure (a rank died, or stopped answering within the timeout) is one line."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:
        raise LoraclsError(f"another process of this torchrun job failed or stopped answering "
                           f"({first_line(e, 100)}); see its output, fix that, and resume with --resume") from None


def shutdown() -> None:
    global _WORLD
    if _WORLD is not None and _WORLD.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = None
