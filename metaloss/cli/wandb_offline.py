"""Read back an offline W&B run (the ``run-*.wandb`` file) without a network or account.

The file is a W&B header (":W&B", 2-byte magic, 1-byte version) followed by a LevelDB-style
log of protobuf ``Record`` messages in 32 KiB blocks. Used by the tests to check what a run
logged, and handy to inspect a run before ``wandb sync``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class _Truncated(Exception):
    """The file ends inside a record: the writer has not flushed it yet."""


def _records(raw: bytes):
    if raw[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + _HEADER])
        data = raw[pos + _HEADER:pos + _HEADER + length]
        if len(data) < length:
            raise _Truncated(pos)
        pos += _HEADER + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            yield data
        elif kind == _FIRST:
            pending = data
        elif kind == _MIDDLE:
            pending += data
        elif kind == _LAST:
            yield pending + data
            pending = b""


def read_run(run_dir: str | Path, wait_s: float = 30.0) -> dict:
    """Return ``{"history": [row, ...], "summary": {...}, "config": {...}, "finished": bool}``
    of an offline run (``finished``: the run's exit record has been written).

    ``run_dir`` is an ``offline-run-*`` directory (or a directory holding exactly one).
    W&B's writer process may still be flushing the file just after ``run.finish()``
    returns; an unfinished file is re-read for up to ``wait_s`` seconds.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb")) or sorted(run_dir.glob("**/offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {run_dir}, found {len(files)}")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            out = _parse(files[0].read_bytes())
            if out["finished"] or time.monotonic() > deadline:
                return out
        except _Truncated:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _parse(raw: bytes) -> dict:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"history": [], "summary": {}, "config": {}, "finished": False}
    for data in _records(raw):
        rec = pb.Record()
        try:
            rec.ParseFromString(data)
        except DecodeError as e:  # a record still being written
            raise _Truncated(str(e)) from e
        kind = rec.WhichOneof("record_type")
        out["finished"] |= kind == "exit"
        if kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                   for i in rec.summary.update})
        elif kind in ("config", "run"):
            updates = rec.config.update if kind == "config" else rec.run.config.update
            out["config"].update({i.key: json.loads(i.value_json) for i in updates})
    return out
