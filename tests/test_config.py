"""Configuration: each invalid value gets an error that names it; the DeepSpeed JSON is checked against the
run config; the command line overrides single fields."""

from __future__ import annotations

import json

import pytest

from wider import cli, ds_config, presets
from wider.models import validate
from wider.config import ConfigError, RunConfig
from wider.optim import learning_rate


def _base() -> RunConfig:
    return presets.get("gpt_smoke")


@pytest.mark.parametrize("section,field,value,needle", [
    ("model", "arch", "transformer-xl", "model.arch"),
    ("model", "num_layers", 0, "model.num_layers"),
    ("model", "hidden_size", 130, "model.hidden_size 130"),
    ("model", "ffn_hidden_size", -4, "model.ffn_hidden_size"),
    ("model", "normalization", "BatchNorm", "model.normalization"),
    ("model", "position_embedding", "alibi", "model.position_embedding"),
    ("model", "activation", "tanh", "model.activation"),
    ("model", "recompute", "selective", "model.recompute"),
    ("model", "hidden_dropout", 1.0, "model.hidden_dropout"),
    ("model", "init_method_std", 0.0, "model.init_method_std"),
    ("data", "data_path", [], "data.data_path"),
    ("data", "data_path", ["0.5", "a", "b"], "data.data_path"),
    ("data", "split", "90,10", "data.split"),
    ("data", "split", "a,b,c", "data.split"),
    ("train", "micro_batch_size", 0, "train.micro_batch_size"),
    ("train", "global_batch_size", 12, "train.global_batch_size 12"),
    ("train", "lr", -1.0, "train.lr"),
    ("train", "min_lr", 1.0, "train.min_lr"),
    ("train", "warmup_iters", 10**6, "train.warmup_iters"),
    ("train", "lr_decay_style", "step", "train.lr_decay_style"),
    ("train", "adam_beta2", 1.0, "train.adam_beta1/adam_beta2"),
    ("train", "clip_grad", -1.0, "train.clip_grad"),
    ("train", "tensor_parallel", 3, "train.tensor_parallel 3"),
    ("train", "exit_at_iter", 0, "train.exit_at_iter"),
    ("train", "log_interval", 0, "train.log_interval"),
])
def test_invalid_values_are_named(section, field, value, needle):
    cfg = _base()
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_world_size_checks():
    cfg = _base()
    cfg.train.tensor_parallel = 2
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        validate(cfg, 3)
    cfg = _base()  # global 32, micro 16: dp 4 needs 64
    with pytest.raises(ConfigError, match="multiple of 64"):
        validate(cfg, 4)
    validate(cfg, 2)


def test_cli_overrides_and_errors(capsys):
    cfg = cli.parse(["--preset", "gpt_125m", "--num-layers", "3", "--no-tie-embeddings", "--data-path", "0.3", "a",
                     "0.7", "b", "--final-eval-iters", "none"])
    assert cfg.preset == "gpt_125m" and cfg.model.num_layers == 3 and cfg.model.hidden_size == 768
    assert cfg.model.tie_embeddings is False and cfg.data.data_path == ["0.3", "a", "0.7", "b"]
    assert cfg.train.final_eval_iters is None
    with pytest.raises(SystemExit) as e:
        cli.parse(["--preset", "gpt_smok"])
    assert e.value.code == 2 and "did you mean 'gpt_smoke'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse(["--num-layers", "three"])
    assert "--num-layers: 'three' is not a valid int" in capsys.readouterr().err


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--help"])
    out = capsys.readouterr().out
    import dataclasses

    for sec in RunConfig().sections().values():
        for f in dataclasses.fields(sec):
            assert "--" + f.name.replace("_", "-") in out
            assert f.metadata.get("help"), f"{f.name} has no documentation"
    for name, _ in presets.describe():
        assert name in out


def test_config_json_round_trip(tmp_path):
    cfg = _base()
    cfg.model.num_layers = 7
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    again = cli.parse(["--config", str(path), "--hidden-size", "256"])
    assert again.model.num_layers == 7 and again.model.hidden_size == 256
    with pytest.raises(ConfigError, match="unknown field model.num_layerz"):
        RunConfig.from_dict({"model": {"num_layerz": 3}})


def test_lr_schedule_shape():
    t = _base().train
    t.train_iters, t.warmup_iters, t.lr, t.min_lr = 100, 10, 1.0, 0.1
    assert learning_rate(0, t) == pytest.approx(0.1)
    assert learning_rate(9, t) == pytest.approx(1.0)
    assert learning_rate(10, t) == pytest.approx(1.0)
    assert learning_rate(55, t) == pytest.approx(0.55)
    assert learning_rate(100, t) == pytest.approx(0.1)


def _write(tmp_path, obj) -> str:
    p = tmp_path / "ds.json"
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def test_ds_config_derives_batch_keys(tmp_path):
    cfg = _base()  # micro 16, global 32
    d = ds_config.build(cfg, dp=1, path=_write(tmp_path, {"zero_optimization": {"stage": 2}}))
    assert d["train_batch_size"] == 32 and d["train_micro_batch_size_per_gpu"] == 16
    assert d["gradient_accumulation_steps"] == 2 and d["gradient_clipping"] == cfg.train.clip_grad
    d = ds_config.build(cfg, dp=2, path=_write(tmp_path, {"train_batch_size": 32}))
    assert d["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("content,needle", [
    ('{"zero_optimization": {"stage": 1},}', "not valid JSON"),
    ('[1, 2]', "must hold a JSON object"),
    ({"zero_optimisation": {"stage": 1}}, "did you mean 'zero_optimization'"),
    ({"train_batch_size": 64}, "sets train_batch_size = 64 but the run config gives 32"),
    ({"gradient_clipping": 0.5}, "gradient_clipping"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer' block"),
    ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
])
def test_ds_config_errors(tmp_path, content, needle):
    with pytest.raises(ConfigError) as e:
        ds_config.build(_base(), dp=1, path=_write(tmp_path, content))
    assert needle in str(e.value)


def test_ds_config_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        ds_config.build(_base(), dp=1, path="ds_configs/nope.json")


def test_shipped_ds_configs_are_valid():
    import os

    for name in os.listdir(os.path.join(ds_config.REPO, "ds_configs")):
        ds_config.build(_base(), dp=1, path=f"ds_configs/{name}")
