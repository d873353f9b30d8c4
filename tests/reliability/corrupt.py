"""Broken inputs for the frames stage, made from real clips at test time: truncations, overwritten and inserted bytes,
patched container headers, lying dimensions, non-video files with video names, and paths that cannot be read.

`make_variants(good, fast, folder)` returns {name: (path, expect)}: expect is "decoded" (a valid video under a
misleading name: must be decoded), "failed" (must be a failure row) or "either" (damaged video: a decoder may
recover frames or give up; it must be one of the two, never a crash or a hang).
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
from pathlib import Path

import numpy as np

DECODED, FAILED, EITHER = "decoded", "failed", "either"


def write_faststart(frames: np.ndarray, path: Path, fps: int = 10) -> Path:
    """The same h264 clip with its index (moov) before the data, so a truncated copy still holds decodable frames."""
    import av

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18", "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _encode(path: Path, fmt: str | None, codec: str, frames: np.ndarray, pix_fmt: str, fps: int = 10) -> Path:
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_audio_only(path: Path, fmt: str, codec: str) -> Path:
    """One second of a 440 Hz tone, no video stream at all."""
    import av

    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=16000)
        stream.layout = "mono"
        t = np.arange(16000) / 16000
        samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16).reshape(1, -1)
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples.shape[1], frame_size):
            chunk = samples[:, start:start + frame_size]
            if codec == "aac":
                frame = av.AudioFrame.from_ndarray((chunk / 32768).astype(np.float32), format="fltp", layout="mono")
            else:
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _patch_box(data: bytearray, fourcc: bytes, offset_after_type: int, fmt: str, values: tuple) -> bytearray:
    """Overwrite a big-endian field `offset_after_type` bytes after the box type `fourcc` (its last occurrence:
    "avc1" is also a brand name inside ftyp, before the sample entry)."""
    at = data.rindex(fourcc) + 4 + offset_after_type
    struct.pack_into(fmt, data, at, *values)
    return data


def _jpeg_sof_patch(data: bytes, width: int, height: int) -> bytes:
    """Rewrite every baseline JPEG frame header (SOF0: FF C0, length, precision, height, width) in an MJPEG file."""
    out, start = bytearray(data), 0
    while (at := out.find(b"\xff\xc0", start)) != -1:
        struct.pack_into(">HH", out, at + 5, height, width)
        start = at + 2
    return bytes(out)


def _overwrite(data: bytes, rng: np.random.Generator, count: int, skip: int = 0) -> bytes:
    out = bytearray(data)
    for at in rng.integers(skip, len(out), count):
        out[at] = int(rng.integers(256))
    return bytes(out)


def _insert(data: bytes, rng: np.random.Generator, count: int) -> bytes:
    at = int(rng.integers(64, len(data) - 64))
    return data[:at] + rng.integers(0, 256, count, dtype=np.uint8).tobytes() + data[at:]


def make_variants(good: Path, fast: Path, frames: np.ndarray, folder: Path,
                  seed: int = 0) -> dict[str, tuple[str, str]]:
    """About seventy broken or misnamed inputs under `folder` made from the good clip (`fast`: its faststart twin)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    raw, raw_fast = good.read_bytes(), fast.read_bytes()
    out: dict[str, tuple[str, str]] = {}

    def put(name: str, data: bytes, expect: str) -> None:
        path = folder / name
        path.write_bytes(data)
        out[name] = (str(path), expect)

    put("empty.mp4", b"", FAILED)
    n = len(raw)
    for cut in (1, 8, 32, 200, 1500, n // 4, n // 2, 3 * n // 4, n - 100, n - 1):
        put(f"trunc_{cut}.mp4", raw[:cut], FAILED if cut < 1500 else EITHER)  # moov at the end: the index is cut off
    m = len(raw_fast)
    for cut in (48, 1000, m // 4, m // 2, 3 * m // 4, m - 1):
        put(f"fast_trunc_{cut}.mp4", raw_fast[:cut], EITHER)
    for i, count in enumerate((1, 4, 16, 64, 256, 1024)):
        put(f"flip_{count}_{i}.mp4", _overwrite(raw, rng, count, skip=64), EITHER)
        put(f"fast_flip_{count}_{i}.mp4", _overwrite(raw_fast, rng, count, skip=64), EITHER)
    put("flip_header.mp4", _overwrite(raw, rng, 16), EITHER)  # ftyp and the first box sizes too
    put("insert_7.mp4", _insert(raw, rng, 7), EITHER)
    put("fast_insert_333.mp4", _insert(raw_fast, rng, 333), EITHER)
    put("random_bytes.mp4", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), FAILED)
    put("zeros.mp4", bytes(n), FAILED)
    put("text.mp4", b"this is a text file, not a video\n" * 20, FAILED)
    put("s3_error.mp4", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                        b"<Message>Access Denied</Message></Error>", FAILED)
    put("html.mp4", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>", FAILED)
    put("json.mp4", b'{"video": "clip.mp4", "frames": [1, 2, 3]}', FAILED)
    put("gzipped.mp4", gzip.compress(raw), FAILED)
    put("ftyp_only.mp4", raw[:32], FAILED)
    # Container damage that keeps every byte of the picture data: a renamed index box, a lying mdat size, zero
    # timescale (division by zero waiting to happen) and a frame size the container says is 65535 x 65535.
    put("moov_renamed.mp4", raw.replace(b"moov", b"free", 1), EITHER)  # FFmpeg looks inside "free" for a lost moov
    put("mdat_huge.mp4", bytes(_patch_box(bytearray(raw), b"mdat", -8, ">I", (0xFFFFFFF0,))), EITHER)
    put("mdhd_timescale_0.mp4", bytes(_patch_box(bytearray(raw), b"mdhd", 4 + 8, ">I", (0,))), EITHER)
    put("mvhd_timescale_0.mp4", bytes(_patch_box(bytearray(raw), b"mvhd", 4 + 8, ">I", (0,))), EITHER)
    huge = _patch_box(bytearray(raw), b"avc1", 24, ">HH", (65535, 65535))
    put("avc1_65535.mp4", bytes(_patch_box(huge, b"tkhd", 76, ">II", (65535 << 16, 65535 << 16))), EITHER)

    mjpeg = _encode(folder / "mjpeg_src.avi", "avi", "mjpeg", frames, "yuvj420p").read_bytes()
    os.remove(folder / "mjpeg_src.avi")
    put("mjpeg_ok.mp4", mjpeg, DECODED)  # an AVI under an .mp4 name: the name must not matter
    for w, h in ((65535, 65535), (16384, 16384), (8000, 6000), (1, 1)):
        put(f"mjpeg_sof_{w}x{h}.avi", _jpeg_sof_patch(mjpeg, w, h), EITHER)

    put("renamed.avi", raw, DECODED)
    put("no_extension", raw, DECODED)
    put("named.txt", raw, DECODED)
    put("mkv_as.mp4", _encode(folder / "tmp.mkv", "matroska", "libx264", frames, "yuv420p").read_bytes(), DECODED)
    os.remove(folder / "tmp.mkv")
    # One Annex-B h264 stream whose resolution changes half way (two encodes back to back).
    small = _encode(folder / "a.h264", "h264", "libx264", frames[:12], "yuv420p").read_bytes()
    big = _encode(folder / "b.h264", "h264", "libx264", np.repeat(np.repeat(frames[12:], 2, 1), 2, 2),
                  "yuv420p").read_bytes()
    os.remove(folder / "a.h264"), os.remove(folder / "b.h264")
    put("resolution_change.h264", small + big, DECODED)
    # The SPS (what the decoder trusts) declares another frame size than the slices hold.
    annexb = _encode(folder / "c.h264", "h264", "libx264", frames, "yuv420p").read_bytes()
    os.remove(folder / "c.h264")
    put("sps_ok.h264", patch_sps_size(annexb, frames.shape[2], -(-frames.shape[1] // 16) * 16), DECODED)
    put("sps_1024x1024.h264", patch_sps_size(annexb, 1024, 1024), EITHER)
    for w, h in ((8192, 8192), (16384, 8192), (16384, 16384)):
        put(f"sps_{w}x{h}.h264", patch_sps_size(annexb, w, h), FAILED)  # bombs: refused before decoding

    from PIL import Image

    image = folder / "still.png"
    Image.fromarray(frames[0]).save(image)
    out["still_png.mp4"] = (str(image.rename(folder / "still_png.mp4")), EITHER)  # one picture: a 1-frame "video"
    out["audio_aac.mp4"] = (str(write_audio_only(folder / "audio_aac.mp4", "mp4", "aac")), FAILED)
    out["audio_wav.mp4"] = (str(write_audio_only(folder / "audio_wav.mp4", "wav", "pcm_s16le")), FAILED)

    # Paths that cannot be read as a file. We run as root, so chmod 000 would not stop us: use things that are not
    # regular files, or that do not resolve.
    (folder / "a_folder.mp4").mkdir()
    out["a_folder.mp4"] = (str(folder / "a_folder.mp4"), FAILED)
    os.symlink(folder / "nowhere.mp4", folder / "dangling.mp4")
    out["dangling.mp4"] = (str(folder / "dangling.mp4"), FAILED)
    os.symlink(folder / "loop.mp4", folder / "loop.mp4")
    out["loop.mp4"] = (str(folder / "loop.mp4"), FAILED)
    os.mkfifo(folder / "fifo.mp4")  # open() blocks forever: a hung mount
    out["fifo.mp4"] = (str(folder / "fifo.mp4"), FAILED)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket.mp4"))
    sock.close()
    out["socket.mp4"] = (str(folder / "socket.mp4"), FAILED)
    (folder / "a_file").write_text("x")
    out["under_a_file.mp4"] = (str(folder / "a_file" / "clip.mp4"), FAILED)
    out["name_too_long.mp4"] = (str(folder / ("n" * 300 + ".mp4")), FAILED)
    out["missing.mp4"] = (str(folder / "missing.mp4"), FAILED)
    os.symlink("/dev/zero", folder / "dev_zero.mp4")  # endless bytes
    out["dev_zero.mp4"] = (str(folder / "dev_zero.mp4"), FAILED)
    return out


class _Bits:
    """Big-endian bit reader/writer with H.264's unsigned Exp-Golomb codes (ue(v))."""

    def __init__(self, data: bytes = b""):
        self.bits = "".join(f"{b:08b}" for b in data)
        self.pos, self.out = 0, []

    def read(self, n: int) -> int:
        value = int(self.bits[self.pos:self.pos + n] or "0", 2)
        self.pos += n
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bits[self.pos + zeros] == "0":
            zeros += 1
        self.pos += zeros + 1
        return (1 << zeros) - 1 + self.read(zeros)

    def write(self, value: int, n: int) -> None:
        self.out.append(format(value, f"0{n}b") if n else "")

    def write_ue(self, value: int) -> None:
        code = format(value + 1, "b")
        self.out.append("0" * (len(code) - 1) + code)

    def copy(self, n: int) -> int:
        value = self.read(n)
        self.write(value, n)
        return value

    def copy_ue(self) -> int:
        value = self.ue()
        self.write_ue(value)
        return value


def _unescape(rbsp: bytes) -> bytes:
    return rbsp.replace(b"\x00\x00\x03", b"\x00\x00")


def _escape(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def patch_sps_size(annexb: bytes, width: int, height: int) -> bytes:
    """An Annex-B H.264 stream whose sequence parameter sets declare `width` x `height` (multiples of 16) while the
    slices still hold the original small pictures: the header lies about the frame size, the decoder believes it."""
    out, start = bytearray(), 0
    for at in [i for i in range(len(annexb) - 3) if annexb[i:i + 4] == b"\x00\x00\x00\x01"] + [len(annexb)]:
        nal = annexb[start:at]
        start = at
        if len(nal) > 5 and nal[4] & 0x1F == 7:  # an SPS
            bits = _Bits(_unescape(nal[5:]))
            profile = bits.copy(8)
            bits.copy(16)  # constraint flags, level
            bits.copy_ue()  # seq_parameter_set_id
            if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
                if bits.copy_ue() == 3:  # chroma_format_idc
                    bits.copy(1)
                bits.copy_ue(), bits.copy_ue(), bits.copy(1)  # bit depths, qpprime bypass
                if bits.copy(1):  # scaling matrices: not produced by x264 here
                    raise ValueError("SPS with scaling matrices is not supported")
            bits.copy_ue()  # log2_max_frame_num_minus4
            if (poc_type := bits.copy_ue()) == 0:
                bits.copy_ue()
            elif poc_type == 1:
                bits.copy(1), bits.ue(), bits.ue()
                raise ValueError("pic_order_cnt_type 1 is not supported")
            bits.copy_ue(), bits.copy(1)  # max_num_ref_frames, gaps allowed
            bits.ue(), bits.ue()
            bits.write_ue(width // 16 - 1)
            bits.write_ue(height // 16 - 1)  # frame_mbs_only is 1 for progressive x264 output
            rest = bits.bits[bits.pos:].rstrip("0")[:-1]  # up to the rbsp stop bit
            payload = "".join(bits.out) + rest + "1"
            payload += "0" * (-len(payload) % 8)
            nal = nal[:5] + _escape(int(payload, 2).to_bytes(len(payload) // 8, "big"))
        out += nal
    return bytes(out)
