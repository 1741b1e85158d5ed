"""What a resumable checkpoint holds, as types, and how it is saved and loaded.

`TrainState` is where the training loop is: epoch, batch, step, the best epoch so far, the running sums of the
current epoch and of the current logging window, and the history.  A checkpoint is that state plus the trainable
tensors, the optimizer, the scheduler and every RNG, written atomically to `checkpoint/state.pt`.  Nothing the
loop needs lives anywhere else, so a resumed run continues exactly where the interrupted one stopped.

Format (version 2): a dict with "version", "backend", "trainable" (a full fine-tune's: every parameter of the
model), "optimizer" (AdamW's state over three parameter groups: head, LoRA A, LoRA B; method full puts everything
in the first), "scheduler", "rng" (a list: every rank's RNG states, one for a single process),
"position" (the TrainState fields but `history`) and "history".  `load` refuses any other version: version 1
held two shapes of "rng" and fewer optimizer groups.
"""

from __future__ import annotations

import dataclasses
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loracls.atomic import atomic_write_bytes
from loracls.errors import LoraclsError, first_line

CHECKPOINT_VERSION = 2  # bump on any change to the format, so that load() refuses what it would misread


@dataclass
class TrainState:
    """Where training is.  Every field is saved in the checkpoint."""

    epoch: int = 0
    """Epochs finished."""
    batch: int = 0
    """Micro-batches of the current epoch done."""
    step: int = 0
    """Optimizer steps done over the whole run."""
    best_score: float = -1.0
    """Best validation score so far, by the task's score metric (the epoch number when there is no validation
    set)."""
    best_epoch: int = -1
    """1-based epoch whose adapter is saved; -1 before the first epoch ends."""
    stale_epochs: int = 0
    """Epochs since the last improvement (early stopping)."""
    loss_sum: float = 0.0
    """Sum of per-example training losses over the current epoch."""
    hits: float = 0.0
    """The task's running training metric summed over the current epoch (correct predictions, for
    single-label)."""
    seen: int = 0
    """Training examples seen in the current epoch."""
    window_loss_sum: float = 0.0
    """Sum of per-example losses since the last logged step."""
    window_seen: int = 0
    """Examples since the last logged step."""
    train_seconds: float = 0.0
    """Wall time spent in the training loop, over all sessions of the run."""
    tokens: int = 0
    """Real (unpadded) training tokens processed."""
    history: list[dict] = field(default_factory=list)
    """The records of history.jsonl: {"type": "step", ...} at log points, {"type": "epoch", ...} per epoch."""

    def add(self, loss_sum: float, hits: float) -> None:
        """Fold sums read off the device into the epoch and window sums (the counts are added per step)."""
        self.loss_sum += loss_sum
        self.window_loss_sum += loss_sum
        self.hits += hits

    def log_step(self, lr: float, seconds: float, batches: int) -> dict:
        """Close the logging window: append its record (the mean loss over the window, not over the epoch, so
        the curve has no cliffs at epoch starts) and open the next window."""
        record = {"type": "step", "step": self.step, "epoch": round(self.epoch + self.batch / batches, 4),
                  "loss": self.window_loss_sum / max(self.window_seen, 1), "lr": lr,
                  "samples_per_s": round(self.window_seen / max(seconds, 1e-9), 2)}
        self.history.append(record)
        self.window_loss_sum, self.window_seen = 0.0, 0
        return record

    def epoch_record(self, validation: dict | None, running: str, keys: tuple[str, ...]) -> dict:
        """Append the finished epoch's record: its training loss and running metric (`train_<running>`), and the
        validation metrics named in `keys`."""
        record = {"type": "epoch", "epoch": self.epoch + 1, "train_loss": self.loss_sum / max(self.seen, 1),
                  f"train_{running}": self.hits / max(self.seen, 1),
                  "validation": None if validation is None else {k: validation[k] for k in keys}}
        self.history.append(record)
        return record

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0
        self.loss_sum, self.hits, self.seen = 0.0, 0.0, 0


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(path: Path, state: TrainState, *, backend: str, trainable: dict[str, torch.Tensor], optimizer, scheduler,
         rng: list[dict]) -> None:
    """rng: every rank's rng_state(), in rank order (one for a single process)."""
    position = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "history"}
    payload = {"version": CHECKPOINT_VERSION, "backend": backend, "trainable": trainable,
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
               "position": position, "history": state.history}
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


@dataclass
class Checkpoint:
    """A loaded checkpoint: the state plus what restores the model, optimizer, scheduler and RNGs."""

    state: TrainState
    backend: str
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: list[dict[str, Any]]
    """Every rank's RNG states, in rank order."""

    def restore(self, model, optimizer, scheduler, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Trainables, optimizer, scheduler, and this rank's RNGs.  A checkpoint from another number of ranks
        gives every rank rank 0's RNGs: the run continues exactly as far as dropout allows."""
        model.load_adapter_state_dict(self.trainable)
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        set_rng_state(self.rng[rank] if len(self.rng) == world_size else self.rng[0], device)


def load(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt or foreign one is a LoraclsError that says how to start over."""
    if not path.is_file():
        raise LoraclsError(f"run {str(path.parent.parent)!r} has no checkpoint yet (it stopped before the first "
                           "save); start it again with --overwrite")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraclsError(f"checkpoint {path} is corrupt ({first_line(e)}); start the run again with "
                           "--overwrite") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else None
        raise LoraclsError(f"checkpoint {path} was written by an incompatible loracls (format {found!r}, this one "
                           f"reads {CHECKPOINT_VERSION}); start the run again with --overwrite")
    state = TrainState(**_renamed(payload["position"]), history=list(payload["history"]))
    return Checkpoint(state, payload.get("backend"), payload["trainable"], payload["optimizer"],
                      payload["scheduler"], payload["rng"])


# Fields a checkpoint written before tasks existed calls by their single-label names; such a run still resumes.
_OLD_NAMES = {"best_accuracy": "best_score", "correct": "hits"}


def _renamed(position: dict) -> dict:
    return {_OLD_NAMES.get(k, k): v for k, v in position.items()}
