"""leanpo_core.export on a local folder and on a real S3 server: the alias's current model is copied to the serving
folder and `current.json` points at it; the registry, not the event, decides what is exported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from leanpo_core import io
from leanpo_core.export import POINTER, export_current, read_pointer
from leanpo_core.registry import Registry, RegistryError
from tests.leanpo_core.test_registry import ALIAS, model_folder, root  # noqa: F401 (root: a fixture)

REPO = Path(__file__).resolve().parents[2]


def test_promotions_and_a_rollback_move_the_serving_pointer(root, tmp_path):  # noqa: F811
    registry = Registry(io.join_uri(root, "registry"))
    target = io.join_uri(root, "serving")
    for name in ("a", "b"):
        registry.register(name, model_folder(tmp_path, name), base_model="sft", reason="trained")
    with pytest.raises(RegistryError, match="no current model"):
        export_current(registry.uri, ALIAS, target)
    assert read_pointer(target) is None

    registry.promote(ALIAS, "a", "beats sft by 2 pp")
    first = export_current(registry.uri, ALIAS, target, expected_model_id="a")
    assert (first["model_id"], first["copied"], first["stale_event"], first["unchanged"]) == ("a", True, False, False)
    assert first["path"] == io.join_uri(target, "a") and first["reason"] == "beats sft by 2 pp"
    assert read_pointer(target)["model_id"] == "a"
    assert io.read_bytes(io.join_uri(target, "a", "model.safetensors")) == \
        (tmp_path / "a" / "model.safetensors").read_bytes()

    registry.promote(ALIAS, "b", "beats a")
    assert export_current(registry.uri, ALIAS, target, expected_model_id="b")["model_id"] == "b"
    registry.rollback(ALIAS, "b regressed in production")
    # the event of b's promotion, handled after the rollback: a is exported again, from the folder already there
    late = export_current(registry.uri, ALIAS, target, expected_model_id="b")
    assert (late["model_id"], late["stale_event"], late["copied"]) == ("a", True, False)
    assert late["reason"] == "b regressed in production"
    again = export_current(registry.uri, ALIAS, target)
    assert again["unchanged"] and not again["copied"]
    pointer = json.loads(io.read_bytes(io.join_uri(target, POINTER)))
    assert pointer["model_id"] == "a" and pointer["registry"] == registry.uri


def test_cli_default_target_and_bad_alias(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register("m1", model_folder(tmp_path, "m1"), reason="trained")
    registry.promote("staging", "m1", "first")
    done = subprocess.run([sys.executable, "-m", "leanpo_core.export", "--registry", registry.uri, "--alias",
                           "staging", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["path"] == str(tmp_path / "registry" / "serving" / "staging" / "m1")
    assert (Path(result["path"]) / "config.json").is_file()
    refused = subprocess.run([sys.executable, "-m", "leanpo_core.export", "--registry", registry.uri, "--alias",
                              "production"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 65 and "no current model" in refused.stderr
