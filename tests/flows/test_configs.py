"""The example configs in configs/: every field of each flow and stage listed with its true default, each example
valid for its flow (train, pipeline), the data refresh run through `leanpo run`, and the flows' manifest input
options (`video_root`, `allowed_roots`) at the ingest task."""

import json
import re

import pytest
import yaml

from flows.cli import flow_parameters, load_flow, read_document
from leanpo_core import io, schemas, synthetic
from leanpo_core.config import (EvaluateConfig, FramesConfig, PairsConfig, PipelineConfig, ReflectConfig,
                                SampleConfig, TrainConfig)
from leanpo_core.gate import GateConfig
from leanpo_core.videos import ManifestError
from tasks import data
from tests.flows.test_cli import REPO, leanpo

CONFIGS = REPO / "configs"
SECTIONS = {"frames": FramesConfig, "sample": SampleConfig, "reflect": ReflectConfig, "pairs": PairsConfig,
            "train": TrainConfig, "evaluate": EvaluateConfig, "gate": GateConfig}
EXAMPLES = ("data-refresh", "train", "pipeline", "export")


def _fields(lines: list[str], indent: str, names) -> dict[str, tuple[bool, object]]:
    """{name: (uncommented, value)} of the `name: value` and `# name: value` lines at `indent` (a comment that
    merely opens with a word and a colon, "# auto: vLLM wherever it imports", names no field)."""
    found = {}
    for line in lines:
        match = re.fullmatch(rf"{indent}(# )?([a-z0-9_]+): (.*)", line)
        if match and match[2] in names:
            found[match[2]] = (not match[1], yaml.safe_load(f"v: {match[3]}")["v"])
    return found


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_field_is_listed_with_its_default(name):
    """Each flow parameter and each field of each stage section appears, set or commented out; a commented-out line
    shows the field's real default, so uncommenting it changes nothing."""
    lines = (CONFIGS / f"{name}.yaml").read_text().splitlines()
    flow_obj = load_flow(name)
    parameters = flow_obj.parameters.properties
    top = _fields(lines, "", parameters)
    assert set(top) | {s for s in SECTIONS if f"{s}:" in lines} == set(parameters), name
    for parameter, (written, value) in top.items():
        if not written:
            assert value == parameters[parameter].get("default"), parameter
    for section, model in SECTIONS.items():
        if f"{section}:" not in lines:
            continue
        start = lines.index(f"{section}:") + 1
        end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
        fields = _fields(lines[start:end], "  ", model.model_fields)
        assert set(fields) == set(model.model_fields), section
        assert any(written for written, _ in fields.values()), f"{section}: no field set, so it would read as null"
        for field, (written, value) in fields.items():
            if not written:
                assert value == model.model_fields[field].default, f"{section}.{field}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_validate_against_their_flow(name):
    """`leanpo run`'s own validation (flows/cli.py) accepts each example; the model it names is the toy world's,
    shipped in the repository; the pipeline's settings pass the cross-stage rules too (a lean view that is lean)."""
    parameters = flow_parameters(load_flow(name), read_document(CONFIGS / f"{name}.yaml"), name)
    if name == "export":  # the registry that the train example's gate writes
        assert parameters["registry"] == read_document(CONFIGS / "train.yaml")["root"] + "/registry"
        return
    models = [parameters[s].model for s in ("sample", "train") if s in parameters]
    assert models and all((REPO / m / "config.json").exists() for m in models), models
    if name == "pipeline":
        PipelineConfig(**{s: parameters[s] for s in SECTIONS if s != "gate"})  # the gate has no cross-stage rules
    if name != "train":  # the manifest the one command in the example's comment writes
        assert parameters["manifest"] == "runs/synthetic/manifest.jsonl"
        assert "-m leanpo_core.synthetic --out runs/synthetic " in (CONFIGS / f"{name}.yaml").read_text()


def _manifest_apart_from_its_videos(tmp_path, num: int = 4) -> tuple[str, str, int]:
    """A synthetic set's clips under tmp/videos and its manifest, with absolute video paths, under tmp/manifests:
    (manifest, video folder, train questions)."""
    videos = tmp_path / "videos"
    rows = [json.loads(line) for line in synthetic.generate(videos, num=num, seed=0, questions_per_clip=1,
                                                            only=("train",)).read_text().splitlines()]
    (tmp_path / "manifests").mkdir()
    manifest = tmp_path / "manifests" / "qa.jsonl"
    manifest.write_text("".join(json.dumps({**row, "video": str(videos / row["video"])}) + "\n" for row in rows))
    return str(manifest), str(videos), len(rows)


def test_data_refresh_example_runs_through_leanpo_run(tmp_path):
    """`leanpo run data-refresh --config` on a copy of the example that points at a manifest kept apart from its
    videos (allowed through `allowed_roots`) and a root under tmp, with the transformers backend and one candidate
    (no vLLM engine to start): every table written, one pair per question, each kept or dropped with its reason."""
    manifest, videos, questions = _manifest_apart_from_its_videos(tmp_path)
    config = yaml.safe_load((CONFIGS / "data-refresh.yaml").read_text())
    root = tmp_path / "run"
    config.update(manifest=manifest, root=str(root), allowed_roots=[videos])
    config["sample"].update(backend="transformers", num_candidates=1)
    config["reflect"]["backend"] = "transformers"
    path = tmp_path / "data-refresh.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = leanpo("run", "data-refresh", "--config", str(path), env={"PREFECT_HOME": str(tmp_path / ".prefect")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = io.read_table(str(root / "videos.parquet"), schemas.VIDEOS)
    assert table.num_rows == questions and all(v.startswith(videos) for v in table.column("video").to_pylist())
    assert io.read_dataset(str(root / "frames"), schemas.FRAMES).num_rows == questions  # one question per clip
    assert io.read_dataset(str(root / "scored"), schemas.SCORED).num_rows == 2 * questions  # 1 candidate x 2 sides
    pairs = io.read_table(str(root / "pairs.parquet"), schemas.PAIRS).to_pylist()
    assert len(pairs) == questions and all(p["kept"] or p["drop_reason"] for p in pairs)


def test_ingest_takes_videos_outside_the_manifest_folder_only_under_allowed_roots(tmp_path, monkeypatch):
    """The data refresh's ingest task refuses a manifest whose videos sit elsewhere, naming each row's video column,
    and accepts it with their folder in `allowed_roots` (or as `video_root` for relative paths)."""
    manifest, videos, questions = _manifest_apart_from_its_videos(tmp_path)
    monkeypatch.setattr(data, "publish_table", lambda *_: None)  # artifacts need a running task; not the point here
    with pytest.raises(ManifestError) as refused:
        data.ingest.fn(manifest, str(tmp_path / "refused"), "train")
    assert all(f"row {row}, column 'video': " in str(refused.value) for row in range(1, questions + 1))
    assert "outside the allowed roots" in str(refused.value) and not (tmp_path / "refused").exists()

    accepted = data.ingest.fn(manifest, str(tmp_path / "run"), "train", allowed_roots=[videos])
    table = io.read_table(accepted["uri"], schemas.VIDEOS)
    assert accepted["rows"] == table.num_rows == questions
    assert all(v.startswith(videos + "/clips/") for v in table.column("video").to_pylist())

    relative = tmp_path / "manifests" / "relative.jsonl"  # the set's own manifest: paths relative to its clips
    relative.write_text((tmp_path / "videos" / "manifest.jsonl").read_text())
    resolved = data.ingest.fn(str(relative), str(tmp_path / "relative"), "train", video_root=videos)
    assert io.read_table(resolved["uri"], schemas.VIDEOS).column("video").to_pylist() == \
        table.column("video").to_pylist()
