"""The main job on the embedded default, run through Prefect with a temporary local server.

Today this is the foundation's smoke run (issue "Foundation"): it builds a toy Video-LLM offline, writes real test
clips, decodes their frames into the `frames` table, and scores one preference pair per clip with the LeanPO
objective through the response-only log-prob path, writing the `pairs` and `train_metrics` tables. The data and
training stages replace these steps as they land.

    leanpo demo [--workdir runs/demo]        # or: make demo
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, task

from leanpo_core import io, schemas
from leanpo_core.layout import RunLayout

CLIPS = [  # seed -> (question, right answer, wrong answer) for toy.write_test_clip's moving square
    (1, "What moves in the video?", "A coloured square moves across the video.", "Nothing moves in the video."),
    (2, "Describe the video.", "A square slides from one side to the other.", "A circle spins in place."),
]


@task
def build_model(family: str, folder: str) -> str:
    """Build (once) the tiny offline model of `family`."""
    from leanpo_core import toy

    if not (Path(folder) / "toy.json").exists():
        toy.build_toy_model(family, folder)
    return folder


@task
def extract_frames(root: str) -> dict:
    """Write the test clips and store their sampled frames in the frames table."""
    from leanpo_core import toy
    from leanpo_core.config import FramesConfig
    from leanpo_core.frames import decode_video

    config, rows = FramesConfig(num_frames=8, max_side=128), []
    for seed, *_ in CLIPS:
        clip = str(toy.write_test_clip(Path(root) / "clips" / f"clip{seed}.mp4", seed=seed))
        video = decode_video(clip, config)
        rows.append({"video_key": f"clip{seed}", "video": clip, "decoder": video.decoder, "sampling": "uniform:8",
                     "frame_indices": video.frame_indices, "timestamps": video.timestamps, "fps": video.fps,
                     "duration": video.duration, "num_frames_total": video.num_frames_total, "width": video.width,
                     "height": video.height, "frames_shape": list(video.frames.shape),
                     "frames": video.frames.tobytes(), "config_hash": config.config_hash()})
    return io.write_shard(rows, RunLayout(root).frames, schemas.FRAMES, 0).to_dict()


@task
def score_pairs(root: str, model_dir: str, frames_manifest: dict) -> dict:
    """Score each clip's (right, wrong) answer pair with LeanPO's loss on response-only log-probs."""
    import numpy as np
    import torch

    from leanpo_core.logps import model_response_logps
    from leanpo_core.loss import leanpo_loss
    from leanpo_core.models import load_model, video_metadata

    model, processor, adapter = load_model(model_dir)
    frames_table = io.read_table(frames_manifest["uri"], schemas.FRAMES).to_pylist()
    sums, counts = [], []
    for row, (_, question, right, wrong) in zip(frames_table, CLIPS):
        frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
        meta = video_metadata(frames, row["fps"], row["frame_indices"], row["num_frames_total"])
        prompt = adapter.build_prompt(processor, question)
        for response in (right, wrong):
            with torch.no_grad():
                s, c = model_response_logps(model, adapter.encode(processor, frames, prompt, response, meta=meta))
            sums.append(s)
            counts.append(c)
    sums, counts = torch.cat(sums), torch.cat(counts).double()
    out = leanpo_loss(sums[0::2], counts[0::2], sums[1::2], counts[1::2])
    rbar = (sums / counts).tolist()
    pairs = [{"pair_id": f"{row['video_key']}-0", "id": row["video_key"], "prompt": question, "chosen": right,
              "rejected": wrong, "video": row["video"], "video_key": row["video_key"], "frames_uri": frames_manifest["uri"],
              "chosen_frame_indices": row["frame_indices"], "rejected_frame_indices": row["frame_indices"],
              "chosen_score": None, "rejected_score": None, "chosen_gen_logp": rbar[2 * i],
              "rejected_gen_logp": rbar[2 * i + 1], "chosen_sft_logp": rbar[2 * i],
              "rejected_sft_logp": rbar[2 * i + 1], "kept": True, "drop_reason": None,
              "model_revision": "toy", "round": 0, "config_hash": "smoke"}
             for i, (row, (_, question, right, wrong)) in enumerate(zip(frames_table, CLIPS))]
    layout = RunLayout(root)
    pairs_manifest = io.write_table(pairs, layout.pairs, schemas.PAIRS)
    metrics_uri = io.join_uri(layout.train("smoke"), "metrics.parquet")
    io.write_table([{"run_id": "smoke", "step": 0, "epoch": 0.0, **{k: out.metrics.get(k) for k in
                     schemas.TRAIN_METRICS.columns[3:]}}], metrics_uri, schemas.TRAIN_METRICS)
    return {"pairs": pairs_manifest.to_dict(), "metrics_uri": metrics_uri, "loss": out.loss.item()}


@flow(name="leanpo-demo", log_prints=True)
def demo(root: str, family: str = "qwen2_vl") -> dict:
    """Smoke run of the foundation: toy model, frames, LeanPO loss on response-only log-probs."""
    model_dir = build_model(family, str(Path(root) / "model"))
    frames_manifest = extract_frames(root)
    return {"frames": frames_manifest, **score_pairs(root, model_dir, frames_manifest)}


def run_demo(workdir: str = "runs/demo", family: str = "qwen2_vl") -> dict:
    """Run the demo flow against a temporary local Prefect server (see `flows.cli.prefect_environment`)."""
    root = str(Path(workdir).resolve())
    start = time.perf_counter()
    result = demo(root, family)
    print(f"\nleanpo demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  frames table : {result['frames']['uri']} ({result['frames']['rows']} rows)")
    print(f"  pairs table  : {result['pairs']['uri']} ({result['pairs']['rows']} pairs)")
    print(f"  metrics      : {result['metrics_uri']}  LeanPO loss {result['loss']:.4f}")
    print(f"  inspect one  : leanpo inspect {result['pairs']['uri']}")
    print(f"  Prefect UI   : PREFECT_HOME={os.environ['PREFECT_HOME']} .venv/bin/prefect server start  "
          "(then open http://127.0.0.1:4200)")
    return result
