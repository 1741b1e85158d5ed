"""--method full: every parameter of the encoder and the head trained, no LoRA.  Checked against a plain transformers
training loop step for step, against transformers' pipeline() on the export (and ONNX Runtime), against the
parameter count of AutoModelForSequenceClassification; resumed after an interruption or kill -9, and run by two
processes under torchrun, against the uninterrupted single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import interrupted_run, predicted_probs, run_cli, train_args, write_csv
from loracls.cli import main

TEXTS = [
    ("Leaders met to discuss the border talks.", "World"), ("The striker scored twice in the final.", "Sports"),
    ("Shares fell after the bank cut its outlook.", "Business"), ("A new chip doubles battery life.", "Tech"),
    ("Protests spread across the capital city.", "World"), ("The champions lost at home on Sunday.", "Sports"),
    ("Oil prices rose for a third week.", "Business"), ("The phone maker unveiled a folding screen.", "Tech"),
    ("Rebels agreed to a ceasefire in the north.", "World"), ("She won the marathon in record time.", "Sports"),
    ("The retailer posted a quarterly loss.", "Business"), ("Researchers built a faster search engine.", "Tech"),
    ("The election result was disputed.", "World"), ("The coach was fired after five defeats.", "Sports"),
    ("Inflation slowed more than expected.", "Business"), ("The software update fixes a security flaw.", "Tech"),
    ("Floods forced thousands from their homes.", "World"), ("The team signed a young goalkeeper.", "Sports"),
    ("The merger created the largest airline.", "Business"), ("A robot learned to fold laundry.", "Tech"),
]
EPOCHS, BATCH, LR, WARMUP, SEED = 4, 10, 1e-2, 0.25, 5
STEPS = EPOCHS * len(TEXTS) // BATCH


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_csv(tmp_path_factory.mktemp("full-data") / "train.csv", ["text", "label"], TEXTS)


def _full_args(model_dir, train, out, *extra):
    """STEPS steps of BATCH, fp32 on the CPU, no validation split (so the saved model is the last step's)."""
    return train_args(model_dir, train, out, "--method", "full", "--epochs", EPOCHS, "--batch-size", BATCH,
                      "--validation-fraction", "0", "--max-length", "64", "--lr", LR, "--warmup-ratio", WARMUP,
                      "--weight-decay", "0.01", "--grad-clip", "1.0", "--precision", "fp32", "--device", "cpu",
                      "--log-every", "1", "--seed", SEED, *extra)


@pytest.fixture(scope="module", params=["peft", "fast"])
def full_run(request, tmp_path_factory, no_dropout_bert_dir, data) -> Path:
    run = tmp_path_factory.mktemp(f"full-{request.param}") / "run"
    assert main(_full_args(no_dropout_bert_dir, data, run, "--backend", request.param)) == 0
    return run


def _reference_loop(model_dir, labels: list[str]):
    """A plain transformers fine-tune of the same batches: the same seed before the head is drawn, AdamW over every
    parameter with transformers' linear warmup schedule, clipping at 1.  Each epoch's order is the one loracls
    draws (Classifier.train_batches: a permutation from a generator seeded by seed * 1_000_003 + epoch), so the two
    loops sum the same examples in the same order.  Returns (model, loss per step)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(labels))
    enc = AutoTokenizer.from_pretrained(str(model_dir))([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    y = torch.tensor([labels.index(label) for _, label in TEXTS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-8, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP * STEPS), STEPS)
    model.train()
    losses = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch))
        for batch in order.split(BATCH):
            loss = model(**{k: v[batch] for k, v in enc.items()}, labels=y[batch]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return model, losses


def test_full_equals_a_plain_transformers_loop_step_for_step(full_run, no_dropout_bert_dir):
    from safetensors.torch import load_file

    labels = json.loads((full_run / "labels.json").read_text())
    reference, losses = _reference_loop(no_dropout_bert_dir, labels)
    steps = [r for r in map(json.loads, (full_run / "history.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert np.allclose([r["loss"] for r in steps], losses, rtol=0, atol=1e-6), ([r["loss"] for r in steps], losses)
    saved = load_file(str(full_run / "adapter" / "model.safetensors"))
    params = dict(reference.named_parameters())
    assert saved.keys() == params.keys()  # every parameter of encoder and head, under transformers' names
    initial = load_file(str(Path(no_dropout_bert_dir) / "model.safetensors"))
    moved = [k for k in initial if not torch.equal(saved[f"bert.{k}"], initial[k])]
    assert len(moved) == len(initial)  # the encoder trained, every tensor of it, not only the head
    asked = yaml.safe_load((full_run / "config.yaml").read_text())["backend"]
    assert json.loads((full_run / "run.json").read_text())["backend"] == asked  # each backend, by name
    worst = max((saved[k] - params[k].detach()).abs().max().item() for k in saved)
    # peft's is transformers' own model: equal to rounding.  The fast encoder sums in another order (q, k and v in
    # one product, no padded rows), and 8 AdamW steps at lr 1e-2 carry those float32 roundings into the weights.
    assert worst <= (1e-6 if asked == "peft" else 2e-5), worst
    m = json.loads((full_run / "metrics.json").read_text())
    total = sum(p.numel() for p in reference.parameters())
    assert m["parameters"]["trainable"] == m["parameters"]["total"] == total


def test_export_equals_the_runs_own_predictions_in_pipeline(full_run, data, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    ours = predicted_probs(full_run, data, tmp_path / "pred.jsonl")
    labels = json.loads((full_run / "labels.json").read_text())
    out = tmp_path / "export"
    assert main(["export", str(full_run), "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["problem_type"] == "single_label_classification"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    clf = pipeline("text-classification", model=str(out), device="cpu", top_k=None)
    got = np.array([[{r["label"]: r["score"] for r in row}[name] for name in labels]
                    for row in clf([t for t, _ in TEXTS])])
    assert np.abs(got - ours).max() < 1e-5
    # the run's own folder is a transformers model too (generic label names, the same weights)
    same = AutoModelForSequenceClassification.from_pretrained(str(full_run / "adapter"))
    exported = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), exported.state_dict().values()))


def test_onnx_serves_what_torch_predicts(full_run, data, tmp_path):
    pytest.importorskip("onnxruntime")
    ours = predicted_probs(full_run, data, tmp_path / "torch.jsonl")
    assert main(["predict", str(full_run), "--input", str(data), "--output", str(tmp_path / "onnx.jsonl"),
                 "--backend", "onnx"]) == 0
    onnx = np.array([list(json.loads(line)["probs"].values())
                     for line in (tmp_path / "onnx.jsonl").read_text().splitlines()])
    assert np.abs(onnx - ours).max() < 1e-4


def _transformers_batch(model_dir, texts, pairs):
    """transformers' own tokenizer output for the texts and the pairs (padded), and the same examples as the id lists
    loracls' backends take (a pair with types 0 then 1 as models.PairIds)."""
    from transformers import AutoTokenizer

    from loracls.models import PairIds

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    batches = [tok(texts, padding=True, return_tensors="pt")]
    if pairs:
        batches.append(tok([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt"))
    for enc in batches:
        ids = []
        for row, mask, types in zip(enc["input_ids"], enc["attention_mask"],
                                    enc.get("token_type_ids", enc["attention_mask"] * 0)):
            n, t = int(mask.sum()), types.tolist()
            ids.append(PairIds(row[:n].tolist(), t.index(1)) if 1 in t[:n] else row[:n].tolist())
        out.append((enc, ids))
    return out


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_the_fast_full_fine_tune_is_transformers_model(model, request):
    """The fast backend's method full is transformers' AutoModelForSequenceClassification: the same parameters under
    the same names in the same order, the same starting weights (the new head drawn from the same seed), the same
    logits and the same gradient of every parameter, on single texts and on pairs; and it reads back any weights
    saved under those names."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from loracls.backends.fast import FastBackend
    from loracls.config import LoraSettings

    model_dir = str(request.getfixturevalue(f"no_dropout_{model}_dir"))
    fast = FastBackend().build(model_dir, AutoConfig.from_pretrained(model_dir), 3, LoraSettings(method="full"),
                               torch.device("cpu"), seed=SEED, precision="fp32").train()
    torch.manual_seed(SEED)
    ref = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).train()
    mine, theirs = dict(fast.trainable_named_parameters()), dict(ref.named_parameters())
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert fast.count_parameters() == (sum(p.numel() for p in ref.parameters()),) * 2
    texts = ["Oil prices rose for a third week.", "A robot learned to fold laundry in the lab today.", "Goal!"]
    pairs = [("The striker scored twice.", "He scored."), ("Shares fell.", "The bank cut its outlook sharply.")]
    for enc, ids in _transformers_batch(model_dir, texts, pairs):
        y = torch.arange(len(ids)) % 3
        for m, logits in ((fast, fast(fast.collate(ids))), (ref, ref(**enc).logits)):
            m.zero_grad()
            torch.nn.functional.cross_entropy(logits, y).backward()
        torch.testing.assert_close(fast(fast.collate(ids)), ref(**enc).logits, atol=1e-5, rtol=1e-4)
        for k, p in mine.items():
            expected = theirs[k].grad if theirs[k].grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4, msg=k)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01)
    fast.load_adapter_state_dict({k: p.detach() for k, p in ref.named_parameters()})
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_fast_full_fine_tune_in_bf16_keeps_fp32_weights(no_dropout_bert_dir):
    """Under bf16 the products run in bfloat16 and every weight stays a float32 parameter that its float32 gradient
    updates (as torch.autocast does for transformers): logits within bf16 rounding of transformers' fp32 ones."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from loracls.backends.fast import CPU_BF16, FastBackend
    from loracls.config import LoraSettings

    model_dir = str(no_dropout_bert_dir)
    fast = FastBackend().build(model_dir, AutoConfig.from_pretrained(model_dir), 3, LoraSettings(method="full"),
                               torch.device("cpu"), seed=SEED, policy=CPU_BF16).train()
    torch.manual_seed(SEED)
    ref = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    [(enc, ids)] = _transformers_batch(model_dir, ["Oil prices rose.", "A robot folds laundry in the lab."], [])
    logits = fast(fast.collate(ids))
    assert fast.precision == "bf16" and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref(**enc).logits, atol=2e-2, rtol=0.1)
    before = fast.adapter_state_dict()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    params = [p for _, p in fast.trainable_named_parameters()]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    after = fast.adapter_state_dict()
    # every tensor moved, but perhaps a key bias: softmax ignores a shift shared by all keys, so its gradient is ~0
    assert sum(not torch.equal(before[k], after[k]) for k in before) >= len(before) - len(fast.layers)
    # merge() stores the layers in bf16 for inference: the very values each product used before
    fast.eval()
    unmerged = fast(fast.collate(ids))
    fast.merge()
    assert all(p.dtype == torch.bfloat16 for p in fast.layers.parameters())
    assert torch.equal(fast(fast.collate(ids)), unmerged)


@pytest.mark.parametrize("model", ["bert", "roberta"])
def test_plan_counts_every_parameter_of_the_transformers_model(model, request, capsys):
    from transformers import AutoModelForSequenceClassification

    import loracls

    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    reference = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4)
    total = sum(p.numel() for p in reference.parameters())
    plan = loracls.plan(str(model_dir), num_labels=4, method="full")
    assert plan.trainable == plan.base_total == total
    encoder = sum(p.numel() for p in reference.base_model.parameters())
    assert plan.breakdown == {"encoder": encoder, "head": total - encoder}
    code, _ = run_cli(["plan", "--model", model_dir, "--num-labels", "4", "--method", "full"], capsys)
    assert code == 0
    code, err = run_cli(["plan", "--model", model_dir, "--num-labels", "4", "--method", "full", "--budget",
                         total - 1], capsys)
    assert code == 2 and len(err) == 1 and f"trainable parameters {total:,} exceed" in err[0]


def test_budget_and_lora_only_settings_are_refused_in_one_line(tiny_bert_dir, data, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    total = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=4).parameters())
    capsys.readouterr()  # transformers' loading report
    refused = {
        ("--max-trainable", total - 1): f"trainable parameters {total:,} exceed --max-trainable {total - 1:,}",
        ("--layers", "0"): "drop --layers",
        ("--head", "linear"): "use --head native",
        ("--init", "pissa"): "--init pissa",
        ("--lora-plus-ratio", "4"): "drop --lora-plus-ratio",
        ("--head-warmup-ratio", "0.1"): "drop --head-warmup-ratio",
    }
    for extra, words in refused.items():
        out = tmp_path / "r"
        code, err = run_cli(train_args(tiny_bert_dir, data, out, "--method", "full", "--device", "cpu", *extra),
                            capsys)
        assert code == 2 and len(err) == 1 and words in err[0], (extra, err)
        assert not out.exists()
    pytest.importorskip("optuna")
    code, err = run_cli(["sweep", "--model", tiny_bert_dir, "--train", data, "--budget", total, "--method", "full",
                         "--output-dir", tmp_path / "sweep"], capsys)
    assert code == 2 and len(err) == 1 and "--method full has no LoRA" in err[0], err
    assert not (tmp_path / "sweep").exists()
    # what LoRA alone reads is ignored: the same count whatever the rank or targets
    import loracls

    assert loracls.plan(str(tiny_bert_dir), num_labels=4, method="full", rank=2, targets="all-linear").trainable \
        == total


@pytest.mark.parametrize("backend", ["peft", "fast"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tiny_bert_dir, data, tmp_path, backend):
    """Dropout on (the RNGs are in the checkpoint), 2 steps an epoch: stopped right after its third checkpoint
    reached the disk, then resumed, the run ends with exactly the weights and history of an uninterrupted one."""
    from safetensors.torch import load_file

    def args(out):
        return _full_args(tiny_bert_dir, data, out, "--save-every-steps", "1", "--backend", backend)

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(args(whole)) == 0
    assert interrupted_run(args(stopped), checkpoints=3) == 130
    assert json.loads((stopped / "run.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0
    a = load_file(str(whole / "adapter" / "model.safetensors"))
    b = load_file(str(stopped / "adapter" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())
               if r["type"] == "step"] for run in (whole, stopped)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_killed_with_sigkill_then_resumed_equals_the_uninterrupted_run(tiny_bert_dir, data, tmp_path):
    """kill -9 just after the first checkpoint reached the disk: every file left is whole, and the resumed run ends
    with exactly the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from helpers import killed_then_resumed

    def args(out):
        return _full_args(tiny_bert_dir, data, out, "--save-every-steps", "1")

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(args(whole)) == 0

    def whole_whatever_instant_the_kill_hit():
        torch.load(killed / "checkpoint" / "state.pt", weights_only=True)

    if not killed_then_resumed(args(killed), killed, before_resume=whole_whatever_instant_the_kill_hit):
        pytest.skip("training finished before the kill landed (machine too fast for this timing)")
    a = load_file(str(whole / "adapter" / "model.safetensors"))
    b = load_file(str(killed / "adapter" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["peft", "fast"])
def test_two_processes_under_torchrun_train_what_one_does(no_dropout_bert_dir, data, tmp_path, backend):
    """DDP reduces every parameter's gradient: the weights of 2 processes at a global batch of 10 equal one
    process's (to float rounding of the averaged gradients)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_full_args(no_dropout_bert_dir, data, one, "--backend", backend)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "loracls",
           *_full_args(no_dropout_bert_dir, data, two, "--backend", backend)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "LORACLS_DIST_TIMEOUT": "60"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    a, b = (load_file(str(r / "adapter" / "model.safetensors")) for r in (one, two))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
