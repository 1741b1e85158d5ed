"""Which precision a model runs in: `fp32`, `bf16`, or `auto` resolved against the machine, in one place.

bf16 here means: the frozen weights and the activations in bfloat16 (half the memory traffic, and the matrix
units of CUDA GPUs and of recent server CPUs), while LoRA's A and B and the head keep fp32 master weights and the
loss and logits are fp32 (under method full every weight is an fp32 master, cast to bf16 where it is used).
Under `auto`:

    fast backend   bf16 on CUDA; on a CPU with bf16 matrix units (AVX-512 BF16: Intel since Cooper Lake, AMD since
                   Zen 4; AMX: Intel since Sapphire Rapids); fp32 on every other CPU
    peft backend   fp32: it is the reference the fast backend is checked against (`--precision bf16` runs it under
                   torch.autocast, what a transformers Trainer user gets with bf16=True)

Why the CPU rule: without bf16 units, bf16 products are emulated and nothing shows them faster than fp32; with
them, a 2048x384 by 384x1536 product ran 2.4x its fp32 rate on an AMD EPYC with AVX-512 BF16 (Zen 4, 2 cores),
and the CPU's bf16 policy keeps every other CPU choice of the fast backend (backends/fast/policy.py).  Training
and prediction speed: docs/benchmarks.md.

The environment variable LORACLS_CPU_BF16=0 makes `auto` treat the CPU as one without bf16 units (fp32), =1 as
one with them: for a CPU whose flags a virtual machine misreports, and for the test suite, whose exact comparisons
against transformers are made in fp32 on every CPU.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from loracls.config import PRECISION_CHOICES
from loracls.errors import LoraclsError

# /proc/cpuinfo flags of bf16 matrix units: AVX-512 BF16 dot products, and AMX's bf16 tiles.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no flags known, so auto keeps fp32
        pass
    return frozenset()


def cpu_bf16_units() -> str | None:
    """The bf16 matrix unit this CPU has ('AMX', 'AVX-512 BF16'), or None."""
    forced = os.environ.get("LORACLS_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return "AVX-512 BF16 (LORACLS_CPU_BF16=1)" if forced == "1" else None
    flags = _cpu_flags()
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def resolve(precision: str, device: torch.device, *, reference: bool = False) -> tuple[str, str]:
    """('fp32' | 'bf16', a few words on why) for `precision` on `device`.  `reference` is the peft backend,
    which `auto` keeps in fp32."""
    if precision not in PRECISION_CHOICES:
        raise LoraclsError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if precision != "auto":
        return precision, "as asked"
    if reference:
        return "fp32", "auto: the reference backend runs in fp32"
    if torch.device(device).type == "cuda":
        return "bf16", "auto: CUDA"
    unit = cpu_bf16_units()
    return ("bf16", f"auto: this CPU has {unit}") if unit else ("fp32", "auto: this CPU has no bf16 matrix units")
