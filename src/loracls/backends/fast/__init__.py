"""The fast backend: loracls' own packed BERT-family encoder with fused LoRA (see model.py)."""

from loracls.backends.fast.model import FastBackend, FastClassifier, FastFullClassifier
from loracls.backends.fast.packing import AttnGroup, FastBatch
from loracls.backends.fast.policy import CPU, CPU_BF16, CUDA, CUDA_FP32, ExecutionPolicy, policy_for

__all__ = ["AttnGroup", "CPU", "CPU_BF16", "CUDA", "CUDA_FP32", "ExecutionPolicy", "FastBackend", "FastBatch",
           "FastClassifier", "FastFullClassifier", "policy_for"]
