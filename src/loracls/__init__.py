"""loracls: fine-tune transformer encoders for text classification with LoRA, under a trainable-parameter budget.

The Python API (loracls.api) mirrors the CLI: train, resume, load (a Predictor), export, plan, sweep, serve.
"""

from loracls._version import __version__
from loracls.api import (Predictor, TrainResult, export, load, make_config, plan, resume, serve, sweep,
                         train)
from loracls.config import RunConfig
from loracls.errors import LoraclsError

__all__ = ["Predictor", "RunConfig", "LoraclsError", "TrainResult", "export", "load", "make_config", "plan", "resume",
           "serve", "sweep", "train", "__version__"]
