"""Every stage's command line reads alike (leanpo_core/stagecli.py): --root and per-table options, an optional
--config, --set FIELD=VALUE overrides, --progress, --json, --help; a bad value stops it naming the field (exit 65)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leanpo_core import stagecli
from leanpo_core.config import ConfigError, PairsConfig, SampleConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
# stage module -> (a field and a value it refuses, arguments the stage needs besides its tables and config)
STAGES = {"sample": ("num_candidates", "0", []), "reflect": ("batch_size", "-1", ["--model", "m"]),
          "pairs": ("min_trust_gap", "-1", []), "train": ("learning_rate", "-1", []),
          "evaluate": ("batch_size", "0", ["--model", "m"]), "frames": ("num_frames", "0", [])}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_takes_the_shared_options(stage, capsys):
    module = importlib.import_module(f"leanpo_core.{stage}")
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--root", "--config", "--set FIELD=VALUE", "--progress", "--no-progress", "--json"):
        assert option in text, (stage, option)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_bad_value_names_the_field_before_any_work(stage, tmp_path):
    field, bad, extra = STAGES[stage]
    module = importlib.import_module(f"leanpo_core.{stage}")
    args = ["--root", str(tmp_path / "run"), "--set", "model=m", *extra] if stage in ("sample", "train") else \
        ["--root", str(tmp_path / "run"), *extra]
    with pytest.raises(ConfigError, match=rf"(?s){field}.*--set {field}|--set {field}.*{field}"):
        module.main([*args, "--set", f"{field}={bad}"])
    with pytest.raises(ConfigError, match="has no field 'no_such_field'"):
        module.main([*args, "--set", "no_such_field=1"])
    assert not (tmp_path / "run").exists()  # nothing was read or written


def test_config_file_section_and_set_overrides(tmp_path):
    """A run config's section is read (as `leanpo run` configs hold them), --set wins over it, values are YAML."""
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({"root": "r", "sample": {"model": "a", "num_candidates": 3}}))
    parser = stagecli.stage_parser("sample", None, ("samples",), SampleConfig)
    args = parser.parse_args(["--config", str(run_config), "--set", "num_candidates=5", "--set", "win_temperature=0.5"])
    config = stagecli.stage_config(args, SampleConfig, "sample")
    assert (config.model, config.num_candidates, config.win_temperature) == ("a", 5, 0.5)
    fields = tmp_path / "train.json"
    fields.write_text('{"model": "m", "lora": true}')
    args = parser.parse_args(["--config", str(fields), "--set", "lora=false"])
    assert stagecli.stage_config(args, TrainConfig, "train").lora is False
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        stagecli.stage_config(parser.parse_args(["--set", "min_trust_gap"]), PairsConfig, "pairs")
    assert stagecli.stage_config(parser.parse_args([]), PairsConfig, "pairs") == PairsConfig()


def test_the_stage_process_exits_65_naming_the_field(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.pairs", "--root", str(tmp_path), "--set",
                           "min_trust_gap=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 65, proc.stderr
    assert "min_trust_gap" in proc.stderr and "Traceback" not in proc.stderr
