"""Configs: shipped files parse, defaults are the reference recipe, bad values and keys fail with one line."""

from pathlib import Path

import pytest

from loracls.config import RunConfig, load_config
from loracls.errors import LoraclsError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # round trip through the dict form


def test_defaults_are_the_reference_recipe():
    ref = load_config(Path(__file__).resolve().parents[1] / "configs" / "agnews-roberta-base.yaml")
    cfg = RunConfig()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (6, 24, 0.1, ["query", "key", "value"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.seed) == (2e-4, 16, 3, 42)
    assert (cfg.train.weight_decay, cfg.train.adam_eps, cfg.train.warmup_ratio, cfg.train.grad_clip) == (0.01, 1e-8, 0.1, 1.0)
    assert cfg.data.max_length == 256 and cfg.data.validation_fraction == 0.1
    assert ref.lora == cfg.lora and ref.train == cfg.train and ref.model == cfg.model


def test_overrides_replace_single_fields():
    cfg = RunConfig().with_overrides({"train.lr": 1e-3, "lora.targets": "q,v", "model": "x", "data.max_length": None})
    assert cfg.train.lr == 1e-3 and cfg.lora.targets == ["query", "value"] and cfg.model == "x"
    assert cfg.data.max_length == 256


@pytest.mark.parametrize("override, fragment", [
    ({"lora.rank": 0}, "lora.rank"), ({"lora.rank": -3}, "lora.rank"), ({"train.lr": 0.0}, "train.lr"),
    ({"train.epochs": 0}, "train.epochs"), ({"train.batch_size": -1}, "train.batch_size"),
    ({"data.max_length": 0}, "data.max_length"), ({"lora.dropout": 1.5}, "lora.dropout"),
    ({"lora.targets": "query,no pe!"}, "no pe!"), ({"train.schedule": "step"}, "train.schedule"),
    ({"backend": "jax"}, "backend"), ({"train.epochs": 1.5}, "whole number"),
])
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(LoraclsError) as e:
        RunConfig().with_overrides(override)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_suggests_the_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(LoraclsError, match="unknown config key"):
        load_config(p)
    p.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(LoraclsError, match="did you mean 'train'"):
        load_config(p)
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(LoraclsError, match="did you mean 'train.lr'"):
        load_config(p)


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: x\ntrain: [unclosed\n")
    with pytest.raises(LoraclsError, match="not valid YAML at line"):
        load_config(p)


def test_yaml_is_read_safely(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LoraclsError):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(LoraclsError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_1m_configs_stay_under_budget(roberta_base_dir, minilm_dir):
    from loracls import planning
    from loracls.models import read_model_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, model_dir in (("agnews-roberta-base-1m.yaml", roberta_base_dir), ("agnews-minilm-1m.yaml", minilm_dir),
                            ("agnews-minilm-1m-distill.yaml", minilm_dir)):
        cfg = load_config(root / name)
        p = planning.count(read_model_config(str(model_dir)), 4, cfg.lora)
        assert p.trainable <= 1_000_000 == cfg.max_trainable, (name, p.trainable)
    ref = load_config(root / "agnews-roberta-base.yaml")
    assert planning.count(read_model_config(str(roberta_base_dir)), 4, ref.lora).trainable == 925_444
