"""TensorBoard logging (`--log-to tensorboard`): the history records as scalars in the run's tensorboard/ folder.

The convention HF Trainer users know: `tensorboard --logdir runs/` shows train/loss, train/lr and
train/samples_per_s per optimizer step, and the epoch's train and validation metrics.  `tensorboard` is an
optional extra, imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path

from loracls.errors import LoraclsError


class NoLog:
    def record(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard:
    def __init__(self, folder: Path, purge_step: int | None = None):
        """purge_step: on resume, the first step not yet checkpointed; TensorBoard hides every event at or past it
        that an earlier, killed session wrote (the resumed run logs those steps again)."""
        self.writer = _summary_writer()(log_dir=str(folder), purge_step=purge_step)

    def record(self, r: dict) -> None:
        if r["type"] == "step":
            for key in ("loss", "lr", "samples_per_s"):
                self.writer.add_scalar(f"train/{key}", r[key], r["step"])
        else:
            for key, value in r.items():  # train_loss and the task's running metric, train_<name>
                if key.startswith("train_"):
                    self.writer.add_scalar(f"epoch/{key}", value, r["epoch"])
            for key, value in (r.get("validation") or {}).items():
                self.writer.add_scalar(f"validation/{key}", value, r["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoraclsError("--log-to tensorboard needs the tensorboard package; pip install tensorboard "
                           "(or loracls[tensorboard])") from None
    return SummaryWriter


def check_log(kind: str) -> None:
    """Refuse a logger whose package is missing, before the run folder exists."""
    if kind == "tensorboard":
        _summary_writer()


def open_log(kind: str, folder: Path, purge_step: int | None = None):
    return TensorBoard(folder, purge_step) if kind == "tensorboard" else NoLog()
