"""The decode worker: one long-lived process that decodes videos for the frames stage and hands their frames over
in shared memory.

A video that hangs (a stalled mount, a FIFO) or crashes its decoder takes only the worker with it: `DecodeWorker`
kills it after `timeout_s`, records the video as failed and starts another, and the batch goes on. The parent
starts the worker as `python -m leanpo_core.decode_worker FD`, FD being its end of a socket pair; nothing else
needs to run this module.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import subprocess
import sys
import traceback
from dataclasses import fields
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from leanpo_core import io
from leanpo_core.config import FramesConfig
from leanpo_core.decode import decode

_WORKER_START_TIMEOUT_S = 120.0  # a cold start imports numpy, pyarrow, av and decord
# glibc serves each converted frame (340 KB at 448x252) by a fresh mmap and unmaps it when freed: 80 page faults a
# frame. Heap allocations up to 64 MB, and a heap kept up to 256 MB, spare most of those faults and much of the
# worker's system time (bench/README.md, frames). Other C libraries ignore these; the environment's own values win.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


class VideoFailed(Exception):
    """One video could not be turned into frames; carries what the failures table records."""

    def __init__(self, error_type: str, message: str, trace: str | None = None):
        super().__init__(f"{error_type}: {message}")
        self.error_type, self.message, self.trace = error_type, message, trace


class _SharedFrames:
    """Allocates a video's frames in an anonymous shared-memory file (Linux memfd) whose descriptor then goes to
    the parent: the decoder writes the pixels once and the parent's Parquet writer reads them in place (a pipe
    would copy them on the way; what that costs: bench/README.md, frames). Unlike /dev/shm (64 MB in a default
    Docker or Kubernetes container), a memfd is limited only by memory. Where memfd does not exist, frames are
    plain arrays and go through the pipe."""

    available = hasattr(os, "memfd_create")

    def __init__(self):
        self.fd: int | None = None
        self.map: mmap.mmap | None = None

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        if not self.available or size == 0:
            return np.empty(shape, np.uint8)
        self.release()  # a backend that failed after allocating
        self.fd = os.memfd_create("leanpo-frames", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))  # one fault
        return np.ndarray(shape, np.uint8, buffer=self.map)

    def holds(self, frames: np.ndarray) -> bool:
        return self.map is not None and frames.nbytes == len(self.map) and \
            np.shares_memory(frames, np.frombuffer(self.map, np.uint8))

    def release(self) -> None:
        if self.map is not None:
            with contextlib.suppress(BufferError):  # an array over it is still referenced (a failed backend's
                self.map.close()                    # traceback): the mapping goes when that array does
            os.close(self.fd)
        self.fd = self.map = None


def serve(fd: int) -> None:
    """The decode worker's loop: receives (config, options) once, then video URIs; answers meta + raw frames (the
    descriptor of a memfd holding them, or their bytes). Ends quietly when the parent is gone (its end of the socket
    closed: e.g. a Dask worker killed inside a frames shard), since nobody is left to answer."""
    try:
        _serve(Connection(fd))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass


def _serve(conn: Connection) -> None:
    from multiprocessing.reduction import send_handle

    config_json, options = conn.recv()
    config = FramesConfig.model_validate_json(config_json)
    import av  # noqa: F401  imported before "ready", so no video's time limit pays for it
    import decord  # noqa: F401

    conn.send("ready")
    shared = _SharedFrames()
    while (video := conn.recv()) is not None:
        try:
            decoded = decode(video, config, options, allocate=shared)
        except Exception as exc:
            shared.release()
            conn.send(("error", type(exc).__name__, str(exc), traceback.format_exc()))
            continue
        meta = {f.name: getattr(decoded, f.name) for f in fields(decoded) if f.name != "frames"}
        meta["frames_shape"] = list(decoded.frames.shape)
        if shared.holds(decoded.frames):
            del decoded  # the last array over the map: it can be closed once the parent holds the descriptor
            conn.send(("ok", meta, "memfd"))
            send_handle(conn, shared.fd, os.getppid())
        else:
            frames = np.ascontiguousarray(decoded.frames)
            del decoded
            conn.send(("ok", meta, "bytes"))
            conn.send_bytes(memoryview(frames).cast("B"))  # raw, unpickled: becomes the `frames` cell as it is
            del frames
        shared.release()


def _receive_pixels(conn: Connection, reply: tuple) -> bytes | memoryview:
    """The frames the worker announced in `reply`: a read-only view of its memfd (mapped, prefaulted, its descriptor
    closed: the memory goes when the view does), or the bytes it sent."""
    from multiprocessing.reduction import recv_handle

    if reply[2] != "memfd":
        return conn.recv_bytes()
    fd = recv_handle(conn)
    try:
        size = int(np.prod(reply[1]["frames_shape"]))
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return memoryview(mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


class DecodeWorker:
    """One long-lived decode process, used for every video of a run and replaced only after a timeout or crash.

    A process per video would pay an interpreter start each; a thread cannot be killed when a decoder hangs inside
    C code. The worker is a fresh `python -m leanpo_core.decode_worker` (not a fork: the parent may hold
    threads, e.g. s3fs's event loop, and not multiprocessing's spawn: that re-imports the caller's __main__).
    """

    def __init__(self, config: FramesConfig, options: io.StorageOptions | None = None):
        self.config, self.options = config, options
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker and wait until it has imported its decoders (done lazily by `decode` otherwise)."""
        import socket

        parent, child = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**MALLOC_ENV, **os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", "leanpo_core.decode_worker", str(child.fileno())],
                                      pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=env)
        child.close()
        self._conn = Connection(parent.detach())
        self._conn.send((self.config.model_dump_json(), self.options))
        if not self._conn.poll(_WORKER_START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the frames decode worker did not start within {_WORKER_START_TIMEOUT_S:.0f} s")
        try:
            self._conn.recv()
        except EOFError:
            code = self._proc.wait()
            self.close()
            raise RuntimeError(f"the frames decode worker exited with code {code} at start (its stderr says why)") \
                from None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # SIGKILL: a decoder stuck in C ignores anything gentler
            self._proc.wait()
            self._conn.close()
        self._proc = self._conn = None

    def decode(self, video: str) -> tuple[dict, bytes | memoryview]:
        """(metadata, raw frames bytes) of `video`; raises VideoFailed (error, timeout or crash of the worker), or
        StorageError when object storage could not be read (not the video's fault: the stage should fail)."""
        if self._proc is None:
            self.start()
        try:
            self._conn.send(video)
        except OSError:  # the idle worker died since the last video (e.g. the OOM killer): start another
            self.close()
            self.start()
            self._conn.send(video)
        if not self._conn.poll(self.config.timeout_s):
            self.close()
            raise VideoFailed("TimeoutError", f"decoding took longer than timeout_s={self.config.timeout_s:g} s; "
                              "the decode worker was killed")
        try:
            reply = self._conn.recv()
            pixels = _receive_pixels(self._conn, reply) if reply[0] == "ok" else b""
        except (EOFError, OSError):
            code = self._proc.wait()
            self.close()
            raise VideoFailed("WorkerCrashed", f"the decode worker died (exit code {code}) while decoding") from None
        if reply[0] == "error" and reply[1] == io.StorageError.__name__:
            raise io.StorageError(reply[2])  # the storage, not the video: fail the stage, do not record it
        if reply[0] == "error":
            raise VideoFailed(*reply[1:])
        return reply[1], pixels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leanpo_core.decode_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fd", type=int, help="the worker's end of the socket pair DecodeWorker passes it")
    serve(parser.parse_args(argv).fd)


if __name__ == "__main__":
    from leanpo_core.launch import stage_entry

    stage_entry(main)
