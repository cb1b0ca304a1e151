"""Read back an offline W&B run (its ``run-*.wandb`` file) without a network or an account.

For tests, and for inspecting an offline run before (or instead of) ``wandb sync``: what
it logged, its group and job type, its metric definitions and the artifacts it recorded.
It is not a W&B replacement: it reads only the record types below, and only the file
format of the ``wandb`` versions in ``pyproject.toml`` (tested with the installed one).

The file is a W&B header (":W&B", 2-byte magic, 1-byte version) followed by a LevelDB-style
log of protobuf ``Record`` messages in 32 KiB blocks.
"""

from __future__ import annotations

import base64
import hashlib
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
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        data = raw[pos + _HEADER : pos + _HEADER + length]
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
    """What an offline run recorded, as plain values::

        {"history": [row, ...], "summary": {...}, "config": {...}, "finished": bool,
         "run": {"id", "project", "entity", "group", "job_type", "name", "tags"},
         "metrics": [{"name" | "glob_name", "step_metric", "summary", ...}, ...],
         "artifacts": [{"name", "type", "aliases", "metadata", "digest",
                        "files": {path: {"digest", "size", "local_path"}}}, ...]}

    ``finished``: the run's exit record has been written. ``metrics`` are the
    ``define_metric`` calls; an artifact's ``local_path`` is W&B's staged copy of the file,
    which ``wandb sync`` uploads (see :func:`artifact_file`).

    ``run_dir`` is an ``offline-run-*`` directory (or a directory holding exactly one).
    W&B's writer process may still be flushing the file just after ``run.finish()``
    returns; an unfinished file is re-read for up to ``wait_s`` seconds.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb")) or sorted(
        run_dir.glob("**/offline-run-*/run-*.wandb")
    )
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


def artifact_file(artifact: dict, path: str) -> Path:
    """The staged local copy of file ``path`` of an artifact from :func:`read_run`, after
    checking that its bytes still have the digest the run recorded (the MD5 that W&B
    uploads and verifies)."""
    entry = artifact["files"].get(path)
    if entry is None:
        raise KeyError(
            f"artifact {artifact['name']!r} has no file {path!r}; "
            f"it has {sorted(artifact['files'])}"
        )
    local = Path(entry["local_path"])
    if not local.is_file():
        raise FileNotFoundError(
            f"{local}: the staged copy of {artifact['name']}/{path} is gone "
            "(W&B removes it after `wandb sync` uploads it)"
        )
    digest = base64.b64encode(hashlib.md5(local.read_bytes()).digest()).decode()
    if digest != entry["digest"]:
        raise ValueError(
            f"{local} does not match the digest recorded for {artifact['name']}/{path}"
        )
    return local


def _items(updates) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in updates}


def _parse(raw: bytes) -> dict:
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {
        "history": [],
        "summary": {},
        "config": {},
        "finished": False,
        "run": {},
        "metrics": [],
        "artifacts": [],
    }
    for data in _records(raw):
        # wandb_internal_pb2 builds its message classes at import time (no stubs).
        rec = pb.Record()  # type: ignore[attr-defined]
        try:
            rec.ParseFromString(data)
        except DecodeError as e:  # a record still being written
            raise _Truncated(str(e)) from e
        kind = rec.WhichOneof("record_type")
        out["finished"] |= kind == "exit"
        if kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "run":
            r = rec.run
            out["config"].update(_items(r.config.update))
            out["run"] = {
                "id": r.run_id,
                "project": r.project,
                "entity": r.entity,
                "group": r.run_group,
                "job_type": r.job_type,
                "name": r.display_name,
                "tags": list(r.tags),
            }
        elif kind == "metric":
            out["metrics"].append(MessageToDict(rec.metric, preserving_proto_field_name=True))
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "digest": a.digest,
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                    "files": {
                        e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path}
                        for e in a.manifest.contents
                    },
                }
            )
    return out
