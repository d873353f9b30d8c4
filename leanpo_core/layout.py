"""Where each table of one pipeline run lives under its root (a local folder or an s3:// prefix).

    <root>/videos.parquet              the validated input manifest (table "videos")
    <root>/frames/part-NNNNN.parquet   sampled frames, one shard per `FramesConfig.shard_size` videos
    <root>/samples/part-NNNNN.parquet  candidates, one shard per `SampleConfig.shard_size` questions
    <root>/scored/part-NNNNN.parquet   candidates with their scores and ranks
    <root>/pairs.parquet               ranked pairs (kept and dropped, with the reason)
    <root>/failures/<stage>/part-NNNNN.parquet   every failed item with its reason
    <root>/train/<run_id>/...          training checkpoints, metrics, the exported model
    <root>/evaluation/<run_id>.parquet evaluation results
    <root>/registry/events/*.parquet   the model registry's log (leanpo_core/registry.py); registry/models/<id>

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

    @property
    def registry(self) -> str:
        return join_uri(self.root, "registry")


def add_table_arguments(parser, stage: str, tables: tuple[str, ...]) -> None:
    """A stage CLI's locations: `--root` (tables at their layout paths) and `--<table>` to override any of them.

    `tables` name RunLayout properties ("videos", "frames", "samples", "scored", "pairs") or "failures" (the
    stage's own failures folder).
    """
    parser.add_argument("--root", help="run root (local folder or s3:// prefix); tables at their layout paths")
    for name in tables:
        where = f"failures folder of the {stage} stage" if name == "failures" else f"{name} table"
        parser.add_argument(f"--{name}", help=f"URI of the {where}, overriding --root's")


def table_arguments(parser, args, stage: str, tables: tuple[str, ...]) -> dict[str, str]:
    """{table: URI} from parsed `add_table_arguments` flags; a parser error names every location left unset."""
    layout = RunLayout(args.root) if args.root else None

    def default(name: str) -> str | None:
        if layout is None:
            return None
        return layout.failures(stage) if name == "failures" else getattr(layout, name)

    uris = {name: getattr(args, name) or default(name) for name in tables}
    missing = [name for name, uri in uris.items() if not uri]
    if missing:
        parser.error(f"give --root or every location (missing: {', '.join('--' + m for m in missing)})")
    return uris
