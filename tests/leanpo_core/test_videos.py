"""Reading video-QA manifests (CSV, JSONL, Parquet, LLaVA-Hound's DPO jsonl) into the videos table, and every
validation error, each naming its row and column."""

import json
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leanpo_core import io, schemas
from leanpo_core.launch import EXIT_BAD_INPUT
from leanpo_core.videos import ManifestError, main, read_videos, resolve_video, write_videos

ROWS = [
    {"id": "q1", "video": "clips/a.mp4", "question": "What colour is the ball?", "answer": "red", "split": "train",
     "source": "mine"},
    {"id": "q2", "video": "clips/a.mp4", "question": "Which way does it move?", "answer": "left", "split": "test",
     "source": "mine"},
    {"id": "q3", "video": "frames/b", "question": "How many cubes?", "answer": "3", "split": "", "source": ""},
]


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        columns = list(rows[0])
        path.write_text(",".join(columns) + "\n" + "".join(",".join(str(r[c]) for c in columns) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_reads_every_format_with_paths_resolved_against_the_manifest(tmp_path, kind):
    rows = read_videos(str(_write(tmp_path / f"qa.{kind}", ROWS, kind)))
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    assert rows[0]["video"] == str(tmp_path / "clips" / "a.mp4")
    assert rows[2]["video"] == str(tmp_path / "frames" / "b")
    assert (rows[0]["split"], rows[0]["source"], rows[2]["split"], rows[2]["source"]) == ("train", "mine", None, None)
    table = io.read_table(write_videos(rows, str(tmp_path / "videos.parquet")).uri, schemas.VIDEOS)
    assert table.num_rows == 3 and table.column("chosen").null_count == 3


def test_reads_llava_hound_dpo_jsonl_unchanged(tmp_path):
    hound = [{"id": "v_abc_0", "video": "v_abc", "prompt": "<video>\nWhat is the man doing?",
              "answer": "He is riding a bike.", "chosen": "A man rides a bike.", "rejected": "A cat sleeps.",
              "chosen_score": 5.0, "rejected_score": 1.0}]
    path = _write(tmp_path / "sft_dpo_17k.jsonl", hound, "jsonl")
    [row] = read_videos(str(path), video_root=str(tmp_path / "frames"))
    assert row == {"id": "v_abc_0", "video": str(tmp_path / "frames" / "v_abc"), "question": "What is the man doing?",
                   "answer": "He is riding a bike.", "split": None, "source": "llava_hound",
                   "chosen": "A man rides a bike.", "rejected": "A cat sleeps."}


def test_reads_from_s3_with_relative_and_rooted_uris(s3_root):
    fs, path = io.filesystem(s3_root)
    rows = [dict(ROWS[0]), {**ROWS[1], "video": f"{s3_root}/elsewhere/c.mp4"}]
    fs.pipe_file(f"{path}/data/qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    with pytest.raises(ManifestError, match=r"row 2, column 'video': .* outside the allowed roots"):
        read_videos(f"{s3_root}/data/qa.jsonl")
    got = read_videos(f"{s3_root}/data/qa.jsonl", roots=[f"{s3_root}/elsewhere"])
    assert [r["video"] for r in got] == [f"{s3_root}/data/clips/a.mp4", f"{s3_root}/elsewhere/c.mp4"]


def _jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD = {"id": "a", "video": "v.mp4", "question": "q?", "answer": "x"}
CASES = {
    "missing column": (_jsonl_bytes([{"id": "a", "video": "v.mp4", "question": "q?"}]),
                       r"missing column\(s\) \['answer'\]"),
    "wrong type": (_jsonl_bytes([GOOD, {**GOOD, "id": "b", "answer": 3.5}]),
                   r"row 2, column 'answer': expected a string, found float"),
    "duplicate id": (_jsonl_bytes([GOOD, GOOD]), r"row 2, column 'id': duplicate id 'a' \(first in row 1\)"),
    "empty question": (_jsonl_bytes([{**GOOD, "question": "  "}]), r"row 1, column 'question': empty"),
    "empty answer": (_jsonl_bytes([{**GOOD, "answer": ""}]), r"row 1, column 'answer': empty"),
    "null answer": (_jsonl_bytes([{**GOOD, "answer": None}]), r"row 1, column 'answer': missing value"),
    "non-UTF-8 bytes": (_jsonl_bytes([GOOD]) + b'{"id": "b", "video": "v.mp4", "question": "caf\xe9", "answer": "x"}\n',
                        r"line 2: not UTF-8 text"),
    "lone surrogate": (b'{"id": "a", "video": "v.mp4", "question": "q\\udc80", "answer": "x"}\n',
                       r"row 1, column 'question': not UTF-8 text"),
    "path traversal": (_jsonl_bytes([{**GOOD, "video": "clips/../../secret.mp4"}]),
                       r"row 1, column 'video': path traversal"),
    "absolute outside roots": (_jsonl_bytes([{**GOOD, "video": "/etc/passwd"}]),
                               r"row 1, column 'video': '/etc/passwd' is outside the allowed roots"),
    "s3 outside roots": (_jsonl_bytes([{**GOOD, "video": "s3://other-bucket/v.mp4"}]),
                         r"row 1, column 'video': .* outside the allowed roots"),
    "unsupported scheme": (_jsonl_bytes([{**GOOD, "video": "http://x/v.mp4"}]),
                           r"row 1, column 'video': unsupported scheme 'http'"),
    "not an object": (b'["a", "b"]\n', r"line 1: expected a JSON object"),
    "invalid json": (_jsonl_bytes([GOOD]) + b"{oops\n", r"line 2: invalid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_row_and_column(tmp_path, case):
    data, message = CASES[case]
    path = tmp_path / "qa.jsonl"
    path.write_bytes(data)
    with pytest.raises(ManifestError, match=message):
        read_videos(str(path))


def test_parquet_and_csv_cells_are_checked_too(tmp_path):
    table = pa.table({"id": ["a", "b"], "video": ["v.mp4", "v.mp4"], "question": ["q?", "q?"],
                      "answer": pa.array([b"ok", b"\xff\xfe"], pa.binary())})
    pq.write_table(table, tmp_path / "qa.parquet")
    with pytest.raises(ManifestError, match=r"row 2, column 'answer': not UTF-8 text"):
        read_videos(str(tmp_path / "qa.parquet"))
    (tmp_path / "qa.csv").write_text("id,video,question,answer\na,v.mp4,q?,x\nb,v.mp4,,x\n")
    with pytest.raises(ManifestError, match=r"row 2, column 'question': empty"):
        read_videos(str(tmp_path / "qa.csv"))


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(_jsonl_bytes([{**GOOD, "question": ""}, {**GOOD, "id": "b", "video": "../x.mp4"}]))
    with pytest.raises(ManifestError, match=r"(?s)2 problem\(s\).*row 1, column 'question'.*row 2, column 'video'"):
        read_videos(str(path))


def test_allowed_roots_and_video_root(tmp_path):
    root = tmp_path / "data"
    assert resolve_video(str(root / "v.mp4"), str(tmp_path / "m"), [str(tmp_path / "m"), str(root)]) == \
        str(root / "v.mp4")
    with pytest.raises(ValueError, match="outside"):  # a sibling whose name merely starts like the root
        resolve_video(str(tmp_path / "data2" / "v.mp4"), str(tmp_path), [str(root)])
    assert resolve_video("s3://b/p/v.mp4", "/x", ["s3://b/p"]) == "s3://b/p/v.mp4"
    with pytest.raises(ValueError, match="outside"):
        resolve_video("s3://b/pp/v.mp4", "/x", ["s3://b/p"])
    path = _write(tmp_path / "qa.jsonl", [GOOD], "jsonl")
    assert read_videos(str(path), video_root=str(root))[0]["video"] == str(root / "v.mp4")


def test_symlinks_are_checked_where_they_lead(tmp_path):
    """A link inside an allowed root that points out of it is refused, naming its row and column (wherever the
    manifest names it: relative or absolute); a link to a file inside the root, and a root that is itself a link to
    a real folder, are accepted. The rows keep the paths as written (resolved against the root, links not followed)."""
    outside, real_root = tmp_path / "outside", tmp_path / "real"
    outside.mkdir()
    (real_root / "clips").mkdir(parents=True)
    (outside / "v.mp4").write_bytes(b"secret")
    (real_root / "clips" / "a.mp4").write_bytes(b"clip")
    (real_root / "evil.mp4").symlink_to(outside / "v.mp4")
    (real_root / "alias.mp4").symlink_to(real_root / "clips" / "a.mp4")
    rows = [{**GOOD, "id": "fine"}, {**GOOD, "id": "alias", "video": "alias.mp4"},
            {**GOOD, "id": "evil", "video": "evil.mp4"},
            {**GOOD, "id": "evil-absolute", "video": str(real_root / "evil.mp4")}]
    path = _write(real_root / "qa.jsonl", rows, "jsonl")
    with pytest.raises(ManifestError) as refused:
        read_videos(str(path))
    message = str(refused.value)
    assert "2 problem(s)" in message
    target = repr(str((outside / "v.mp4").resolve()))
    for row, video in ((3, "'evil.mp4'"), (4, repr(str(real_root / "evil.mp4")))):
        assert re.search(rf"row {row}, column 'video': {re.escape(video)} \(which resolves to {re.escape(target)}\) "
                         "is outside the allowed roots", message), message

    link_root = tmp_path / "link"  # the root folder itself a link: the manifest read through it
    link_root.symlink_to(real_root, target_is_directory=True)
    rows = [{**GOOD, "id": "clip", "video": "clips/a.mp4"}, {**GOOD, "id": "alias", "video": "alias.mp4"},
            {**GOOD, "id": "absolute", "video": str(link_root / "clips" / "a.mp4")}]
    _write(real_root / "ok.jsonl", rows, "jsonl")
    assert [r["video"] for r in read_videos(str(link_root / "ok.jsonl"))] == \
        [str(link_root / "clips" / "a.mp4"), str(link_root / "alias.mp4"), str(link_root / "clips" / "a.mp4")]
    assert resolve_video(str(link_root / "clips" / "a.mp4"), str(outside), [str(outside), str(link_root)]) == \
        str(link_root / "clips" / "a.mp4")
    with pytest.raises(ValueError, match="which resolves to"):
        resolve_video(str(real_root / "evil.mp4"), str(real_root), [str(real_root)])
    # allowed once the folder it leads to is an allowed root too
    assert resolve_video(str(real_root / "evil.mp4"), str(real_root), [str(real_root), str(outside)]) == \
        str(real_root / "evil.mp4")


def test_cli_validates_and_writes(tmp_path, capsys):
    path = _write(tmp_path / "qa.jsonl", ROWS, "jsonl")
    manifest = main([str(path), "--videos", str(tmp_path / "out" / "videos.parquet"), "--json"])
    assert manifest.rows == 3 and json.loads(capsys.readouterr().out)["rows"] == 3
    (tmp_path / "bad.jsonl").write_bytes(_jsonl_bytes([GOOD, GOOD]))
    with pytest.raises(ManifestError, match="duplicate id"):
        main([str(tmp_path / "bad.jsonl"), "--videos", str(tmp_path / "bad.parquet")])
    # As a process: the one bad-input rule of every stage (launch.stage_entry), one line naming the problem, exit 65.
    proc = subprocess.run([sys.executable, "-m", "leanpo_core.videos", str(tmp_path / "bad.jsonl"), "--root",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT and "Traceback" not in proc.stderr
    assert "leanpo_core.videos: bad input: ManifestError" in proc.stderr and "duplicate id" in proc.stderr
    assert not (tmp_path / "bad.parquet").exists() and not (tmp_path / "videos.parquet").exists()
