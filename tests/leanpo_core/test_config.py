"""Stage configs validate on construction and name the bad field; leanpo_core stays Prefect-free."""

import json
import math
import pkgutil
import subprocess
import sys

import pytest
from pydantic import ValidationError

import leanpo_core
from leanpo_core.config import (
    ConfigError, FramesConfig, PipelineConfig, SampleConfig, TrainConfig, load_config,
)


def test_defaults_follow_method_md():
    train = TrainConfig(model="m")
    assert (train.effective_beta, train.gamma, train.label_smoothing, train.smoothing_threshold, train.sft_weight) == (
        2.0, 0.5, 0.1, 0.0, 0.5)
    assert (train.learning_rate, train.warmup_ratio, train.weight_decay) == (5e-7, 0.1, 0.0)
    assert TrainConfig(model="m", objective="dpo").effective_beta == 0.1
    sample = SampleConfig(model="m")
    assert (sample.win_top_p, sample.lose_top_p, sample.lose_frames, sample.num_candidates) == (0.9, 1.0, 2, 1)
    assert FramesConfig().num_frames == 16


@pytest.mark.parametrize("cls, kwargs, field", [
    (FramesConfig, {"num_frames": 0}, "num_frames"),
    (FramesConfig, {"min_frames": 40, "max_frames": 8}, "min_frames"),
    (FramesConfig, {"sampling": "random"}, "sampling"),
    (SampleConfig, {"model": "m", "win_top_p": 0.0}, "win_top_p"),
    (SampleConfig, {"model": "m", "aug_crop_scale_min": 0.5, "aug_crop_scale_max": 0.3}, "aug_crop_scale_min"),
    (SampleConfig, {"model": ""}, "model"),
    (TrainConfig, {"model": "m", "label_smoothing": 0.7}, "label_smoothing"),
    (TrainConfig, {"model": "m", "smoothing_threshold": math.nan}, "smoothing_threshold"),
    (TrainConfig, {"model": "m", "lora": True, "deepspeed": "zero3"}, "zero3"),
    (TrainConfig, {"model": "m", "learning_rte": 1e-6}, "learning_rte"),
])
def test_invalid_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ValidationError) as err:
        cls(**kwargs)
    assert field in str(err.value)


def test_hash_is_stable_and_sensitive():
    assert TrainConfig(model="m").config_hash() == TrainConfig(model="m").config_hash()
    assert TrainConfig(model="m").config_hash() != TrainConfig(model="m", gamma=1.0).config_hash()


def test_load_config_reports_file_and_field(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text("sample: {model: toy}\ntrain: {model: toy, gamma: 1.0}\nframes: {num_frames: 8}\n")
    config = load_config(good, PipelineConfig)
    assert config.train.gamma == 1.0 and config.frames.num_frames == 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sample": {"model": "toy"}, "train": {"model": "toy", "epochs": -1}}))
    with pytest.raises(ConfigError, match=r"(?s)bad\.json.*train\.epochs"):
        load_config(bad, PipelineConfig)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", PipelineConfig)


def test_core_never_imports_prefect():
    names = [f"leanpo_core.{m.name}" for m in pkgutil.iter_modules(leanpo_core.__path__) if not m.name.startswith("_")]
    code = (f"import sys, importlib\nfor n in {names!r}: importlib.import_module(n)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
