"""The fast backend: loracls' own packed BERT-family encoder with fused LoRA (see model.py)."""

from loracls.backends.fast.model import FastBackend, FastClassifier
from loracls.backends.fast.packing import AttnGroup, FastBatch
from loracls.backends.fast.policy import CPU, CUDA, ExecutionPolicy, policy_for

__all__ = ["AttnGroup", "CPU", "CUDA", "ExecutionPolicy", "FastBackend", "FastBatch", "FastClassifier", "policy_for"]
