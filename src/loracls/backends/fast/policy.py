"""The execution policy: every choice the fast backend makes by device, made once, here.

The CPU and CUDA paths differ in storage precision, dropout randomness, the attention kernel used in training,
how a padded batch is grouped for attention, and how inference batches are sized.  Code reads these fields and
never asks which device it runs on, so the test suite can run the CUDA policy on the CPU and cover every branch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExecutionPolicy:
    name: str
    storage_dtype: torch.dtype
    """Frozen weights and activations.  bf16 on CUDA (tensor cores, half the memory traffic); LoRA and the head
    keep fp32 master weights and the logits are fp32 either way."""
    cheap_dropout: bool
    """Dropout masks from int16 uniforms, four per 64-bit draw (on the CPU, F.dropout's per-element bernoulli_
    costs more than the GEMMs it sits between), with LoRA dropout's 1/(1-p) folded into the B GEMM."""
    hand_attention: bool
    """Training attention with dropout through the hand-written autograd function (SDPA's fused CPU kernel has no
    dropout and falls back to a slow generic path); otherwise SDPA with dropout_p."""
    attention_groups: bool
    """Split a padded batch into groups of similar length, each padded to its own longest (CPU); on CUDA one group
    per batch, as kernel launches outweigh the padded attention work."""
    eval_token_cap: float
    """Most real tokens in one inference batch: on the CPU bigger batches fall out of the cache."""
    non_blocking: bool
    """Host-to-device copies overlap with compute (CUDA)."""


# CPU inference: with MiniLM on 2 cores, 1,000 to 2,000 tokens per batch ran fastest, about 1.25x faster than
# 13,500 (256 AG News texts of mean length 53).
CPU = ExecutionPolicy("cpu", torch.float32, cheap_dropout=True, hand_attention=True, attention_groups=True,
                      eval_token_cap=1536, non_blocking=False)
CUDA = ExecutionPolicy("cuda", torch.bfloat16, cheap_dropout=False, hand_attention=False, attention_groups=False,
                       eval_token_cap=math.inf, non_blocking=True)


# bf16 storage on a CPU with bf16 matrix units (backends/precision.py decides when): the CPU's other choices stay.
CPU_BF16 = dataclasses.replace(CPU, name="cpu-bf16", storage_dtype=torch.bfloat16)
CUDA_FP32 = dataclasses.replace(CUDA, name="cuda-fp32", storage_dtype=torch.float32)


def policy_for(device: torch.device, precision: str | None = None) -> ExecutionPolicy:
    """The policy for a device and a resolved precision ('fp32' or 'bf16'); None: the device's default (bf16 on
    CUDA, fp32 on the CPU)."""
    cuda = torch.device(device).type == "cuda"
    if precision is None:
        return CUDA if cuda else CPU
    if cuda:
        return CUDA if precision == "bf16" else CUDA_FP32
    return CPU_BF16 if precision == "bf16" else CPU
