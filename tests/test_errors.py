"""Every user-caused error: one line on stderr naming the problem, exit code 2, no traceback, nothing written; a bad
torchrun environment included.  A bug is not a user's error: it keeps its type."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import loracls_command, run_cli, train_args
from loracls import distributed
from loracls.cli import main
from loracls.errors import LoraclsError


def assert_clean_error(code, err, fragment):
    assert code == 2, err
    assert err and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("loracls") and "error:" in err[-1]
    assert fragment.lower() in err[-1].lower(), err[-1]


@pytest.fixture
def base_args(tiny_bert_dir, small_agnews, tmp_path):
    return train_args(tiny_bert_dir, small_agnews / "train.csv", tmp_path / "run", "--epochs", "1", "--device", "cpu",
                      "--max-length", "32")


@pytest.mark.parametrize("extra, fragment", [
    (["--rank", "0"], "lora.rank"), (["--lr", "-1"], "train.lr"), (["--epochs", "0"], "train.epochs"),
    (["--batch-size", "0"], "train.batch_size"), (["--max-length", "0"], "max_length"),
    (["--rank", "33"], "hidden size"), (["--max-length", "600"], "positions"),
    (["--targets", "query,foo"], "target 'foo' matches no linear layer"), (["--max-trainable", "10"], "exceed"),
    (["--text-columns", "nope"], "nope"), (["--label-column", "zzz"], "zzz"),
    (["--layers", "7"], "layer 7"),
])
def test_bad_training_arguments(base_args, extra, fragment, capsys, tmp_path):
    code, err = run_cli(base_args + extra, capsys)
    assert_clean_error(code, err, fragment)
    assert not (tmp_path / "run").exists(), "a refused run must leave nothing behind"


def test_missing_model_and_data(base_args, tmp_path, capsys):
    args = list(base_args)
    args[args.index("--model") + 1] = tmp_path / "no-model"
    assert_clean_error(*run_cli(args, capsys), "does not exist")
    args = list(base_args)
    args[args.index("--train") + 1] = tmp_path / "missing.csv"
    assert_clean_error(*run_cli(args, capsys), "does not exist")


def test_model_without_weights(roberta_base_dir, small_agnews, tmp_path, capsys):
    code, err = run_cli(["train", "--model", roberta_base_dir, "--train", small_agnews / "train.csv",
                         "--output-dir", tmp_path / "r"], capsys)
    assert_clean_error(code, err, "no weights")


def test_empty_and_out_of_range_data(base_args, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    args = list(base_args)
    args[args.index("--train") + 1] = empty
    assert_clean_error(*run_cli(args, capsys), "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text('"1","a","b"\n"9","c","d"\n')
    (tmp_path / "classes.txt").write_text("A\nB\nC\nD\n")
    args[args.index("--train") + 1] = bad
    assert_clean_error(*run_cli(args, capsys), "line 2")


def test_existing_run_is_refused_and_untouched(base_args, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"status": "completed", "format_version": 1}')
    (run / "metrics.json").write_text("precious")
    assert_clean_error(*run_cli(base_args, capsys), "--overwrite")
    assert (run / "metrics.json").read_text() == "precious"


def test_missing_corrupt_and_incompatible_run_dirs(tmp_path, capsys, small_agnews):
    data = small_agnews / "test.csv"
    assert_clean_error(*run_cli(["evaluate", tmp_path / "nope", "--data", data], capsys), "does not exist")
    run = tmp_path / "run"
    run.mkdir()
    assert_clean_error(*run_cli(["predict", run, "--input", data, "--output", tmp_path / "o"], capsys), "run.json")
    (run / "run.json").write_text("{not json")
    assert_clean_error(*run_cli(["export", run, "--output", tmp_path / "e"], capsys), "corrupt")
    (run / "run.json").write_text(json.dumps({"status": "completed", "format_version": 99}))
    assert_clean_error(*run_cli(["evaluate", run, "--data", data], capsys), "version")
    (run / "run.json").write_text(json.dumps({"status": "interrupted", "format_version": 1}))
    assert_clean_error(*run_cli(["predict", run, "--input", data, "--output", tmp_path / "o"], capsys), "no complete model")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_corrupt_adapter(tmp_path, capsys, tiny_bert_dir, small_agnews):
    run = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, small_agnews / "train.csv", run, "--epochs", "1", "--max-train-samples", "32",
                           "--max-length", "32")) == 0
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    code, err = run_cli(["predict", run, "--input", small_agnews / "test.csv", "--output", tmp_path / "p.jsonl"], capsys)
    assert_clean_error(code, err, "corrupt or truncated")
    assert not (tmp_path / "p.jsonl").exists()
    shutil.rmtree(run / "adapter")
    assert_clean_error(*run_cli(["export", run, "--output", tmp_path / "e"], capsys), "no complete model")


def test_usage_errors_are_one_line(capsys):
    res = subprocess.run(loracls_command("train", "--epochs", "many"), capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--epochs" in res.stderr


def test_error_through_a_real_process_has_no_traceback(tmp_path):
    res = subprocess.run(loracls_command("evaluate", tmp_path / "nope", "--data", "x.csv"), capture_output=True,
                         text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_targets_matching_no_module_list_the_real_names(tmp_path, minilm_dir, capsys):
    """A target name DistilBERT does not have: the message lists the linear layers it does have."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    folder = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(folder)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"example {i},{i % 2}\n" for i in range(20)))
    code, err = run_cli(train_args(folder, data, tmp_path / "run", "--backend", "auto", "--targets", "query,qkv_lin"),
                        capsys)
    assert_clean_error(code, err, "matches no linear layer")
    assert "q_lin" in err[-1]
    assert not (tmp_path / "run").exists()


def test_blank_texts_are_skipped_and_long_texts_truncated_and_counted(tmp_path, tiny_bert_dir):
    rows = ["text,label"] + [f"sample number {i} about topic {i % 3},{i % 3}" for i in range(40)]
    rows[5] = '"   ",1'
    rows[9] = ",2"
    rows[12] = '"' + "word " * 5000 + '",0'
    data = tmp_path / "d.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(train_args(tiny_bert_dir, data, out, "--test", data, "--epochs", "1", "--max-length", "32")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["skipped_empty"]["test"] == 2
    assert m["data"]["truncated"]["test"] == 1
    assert m["data"]["test_examples"] == 38
    report = (out / "report.md").read_text()
    assert "truncated" in report.lower()


def _tiny_run(tmp_path, model_dir, labels) -> Path:
    """A completed one-epoch run on 20 two-class rows labelled with `labels`, in tmp_path / "run"."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{labels[i % 2]}\n" for i in range(20)))
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, "--epochs", "1", "--max-length", "16")) == 0
    return out


def test_unknown_labels_at_evaluate_time(tmp_path, tiny_bert_dir, capsys):
    out = _tiny_run(tmp_path, tiny_bert_dir, ["cat", "dog"])
    other = tmp_path / "e.csv"
    other.write_text("text,label\nhello,cat\nworld,bird\n")
    assert_clean_error(*run_cli(["evaluate", out, "--data", other], capsys), "bird")


def test_resume_of_a_completed_run_is_refused(tmp_path, tiny_bert_dir, capsys):
    out = _tiny_run(tmp_path, tiny_bert_dir, ["0", "1"])
    assert_clean_error(*run_cli(["train", "--resume", out], capsys), "already completed")
    assert_clean_error(*run_cli(["train", "--resume", out, "--epochs", "3"], capsys), "--epochs")


# -- a bug keeps its type --------------------------------------------------------------------------------------------
def test_on_main_in_one_process_keeps_the_error_it_got():
    """A bug (an OSError with no user-facing cause) keeps its type, hence its traceback; a user's OSError is left
    to the CLI, which words it.  Neither becomes a 'rank 0 failed' LoraclsError."""
    world = distributed.World()

    def bug():
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError) as info:
        world.on_main(bug)
    assert not isinstance(info.value, LoraclsError) and info.value.errno == errno.EBADF
    assert world.on_main(lambda: 41 + 1) == 42


# -- a bad torchrun environment --------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set"),
])
def test_a_bad_torchrun_environment_is_one_line(monkeypatch, env, words):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_WORLD", None)
    with pytest.raises(LoraclsError, match=words) as info:
        distributed.world()
    assert "\n" not in str(info.value) and "torchrun" in str(info.value)
    assert distributed._WORLD is None


def test_a_bad_torchrun_environment_exits_2_without_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WORLD_SIZE"] = "2"
    res = subprocess.run(loracls_command("train", "--model", tmp_path / "nowhere", "--train", tmp_path / "none.csv",
                                         "--output-dir", tmp_path / "r"),
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "RANK is not set" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "r").exists()
