"""What only a CUDA device can show: the fused CUDA kernels (SDPA's flash / memory-efficient attention with a
padding mask, fused AdamW) in the fast backend, against transformers + PEFT on the same GPU.  Marked `cuda`:
skipped (with the reason) without a GPU, and run by bench/gpu_check.py on the GPU machine."""

from __future__ import annotations

import pytest
import torch

from loracls.config import LoraSettings

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")]

TEXTS = ["Stocks rallied after the bank kept rates unchanged.", "The team won.", "A new chip doubles the speed "
         "of phones while using less power, the company said on Monday.", "Oil"]


def _build(model_dir, backend, lora, seed=0):
    from loracls import build

    base = build.base_model(str(model_dir))
    return build.classifier(base, 4, lora, backend=backend, device=torch.device("cuda"), seed=seed).model, \
        base.tokenizer


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_fast_on_cuda_matches_peft_on_cuda_after_training_steps(model, request):
    from loracls.training import make_optimizer
    from loracls.config import TrainSettings

    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, targets=["all-linear"])
    fast, tok = _build(model_dir, "fast", lora)
    peft, _ = _build(model_dir, "peft", lora, seed=1)
    fast.load_adapter_state_dict(peft.adapter_state_dict())
    ids = tok(TEXTS)["input_ids"]
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    for m in (fast, peft):
        opt = make_optimizer(m, TrainSettings(lr=1e-2), torch.device("cuda"))  # fused AdamW on CUDA
        m.train()
        for _ in range(3):
            torch.nn.functional.cross_entropy(m(m.collate(ids)), y).backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        a, b = fast.eval()(fast.collate(ids)), peft.eval()(peft.collate(ids))
    assert a.dtype == torch.float32 and (a - b).abs().max().item() < 0.1  # bf16 storage in the fast backend
    assert (a.argmax(-1) == b.argmax(-1)).all()
