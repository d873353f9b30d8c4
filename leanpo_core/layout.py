"""Where each table of one pipeline run lives under its root (a local folder or an s3:// prefix).

    <root>/videos.parquet              the validated input manifest (table "videos")
    <root>/frames/part-NNNNN.parquet   sampled frames, one shard per `FramesConfig.shard_size` videos
    <root>/samples/part-NNNNN.parquet  candidates, one shard per `SampleConfig.shard_size` questions
    <root>/scored/part-NNNNN.parquet   candidates with their scores and ranks
    <root>/pairs.parquet               ranked pairs (kept and dropped, with the reason)
    <root>/failures/<stage>/part-NNNNN.parquet   every failed item with its reason
    <root>/train/<run_id>/...          training checkpoints, metrics, the exported model
    <root>/evaluation/<run_id>.parquet evaluation results

Sharded tables resume shard by shard: a shard whose manifest exists is done and is not redone.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanpo_core.io import join_uri


@dataclass(frozen=True)
class RunLayout:
    root: str

    @property
    def videos(self) -> str:
        return join_uri(self.root, "videos.parquet")

    @property
    def frames(self) -> str:
        return join_uri(self.root, "frames")

    @property
    def samples(self) -> str:
        return join_uri(self.root, "samples")

    @property
    def scored(self) -> str:
        return join_uri(self.root, "scored")

    @property
    def pairs(self) -> str:
        return join_uri(self.root, "pairs.parquet")

    def failures(self, stage: str) -> str:
        return join_uri(self.root, "failures", stage)

    def train(self, run_id: str) -> str:
        return join_uri(self.root, "train", run_id)

    def evaluation(self, run_id: str) -> str:
        return join_uri(self.root, "evaluation", f"{run_id}.parquet")
