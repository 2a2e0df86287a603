"""Read back what a W&B run recorded, from its ``run-*.wandb`` file (a test helper, not tests).

wandb no longer ships a reader. The file is LevelDB's log format: a 7-byte header (``:W&B``, a
2-byte magic, a version byte), then 32 KiB blocks of chunks. Each chunk has a 7-byte header
(crc32 of type byte + data, length, type: 1 whole, 2 first, 3 middle, 4 last); a block's last
< 7 bytes are zero padding. A record (one or more chunks) is a serialized
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")  # ident, magic, version
CHUNK = struct.Struct("<IHB")  # crc32, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path) -> list[pb.Record]:
    """Every complete record in the file; a record still being written at the end is left out.

    Raises:
        ValueError: not a .wandb file, or a chunk whose checksum does not match.
    """
    data = Path(path).read_bytes()
    ident, _, _ = HEADER.unpack_from(data)
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r}).")
    records, parts, pos = [], [], HEADER.size
    while True:
        if BLOCK - pos % BLOCK < CHUNK.size:  # too little room for a header: padding
            pos += BLOCK - pos % BLOCK
        if pos + CHUNK.size > len(data):
            return records
        crc, length, kind = CHUNK.unpack_from(data, pos)
        body = data[pos + CHUNK.size: pos + CHUNK.size + length]
        if len(body) < length:  # still being written
            return records
        if zlib.crc32(bytes([kind]) + body) != crc:
            raise ValueError(f"{path}: bad checksum in the chunk at byte {pos}.")
        pos += CHUNK.size + length
        parts = [body] if kind in (FULL, FIRST) else parts + [body]
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)


def wait_for_exit(path, timeout: float = 30.0) -> list[pb.Record]:
    """The file's records once its ``exit`` record is there (wandb may write it after ``finish()``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path) if Path(path).exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"No exit record in {path} after {timeout} s ({len(records)} records).")
        time.sleep(0.1)


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)  # "amp/loss_scale" is one key; {"a": {"b": 1}} is "a.b"


def history(records) -> list[dict]:
    """One dict per history row, in order, values decoded from JSON (``_step`` included)."""
    return [{_key(i): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def config(records) -> dict:
    """The run's config: the run record's, updated by each config record."""
    out: dict = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else ()
        out.update({_key(u): json.loads(u.value_json) for u in updates})
    return out


def summary(records) -> dict:
    """The run's final summary: every summary record's updates, in order."""
    out: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(u): json.loads(u.value_json) for u in r.summary.update})
    return out
