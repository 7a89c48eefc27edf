"""Reading W&B's offline ``.wandb`` files with W&B's own record type (the protobuf ``Record`` of the
installed wandb). The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then
32 KiB blocks of records, each a 7-byte header (crc32 u32, length u16, type u8: full / first / middle /
last) and its payload; a record that does not fit in a block's rest continues in the next."""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore file"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:                                  # a block's tail too short for a header: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            pending, whole = b"", payload
        elif kind == FIRST:
            pending, whole = payload, None
        elif kind == MIDDLE:
            pending, whole = pending + payload, None
        else:
            pending, whole = b"", pending + payload
        if whole is not None:
            record = pb.Record()
            record.ParseFromString(whole)
            out.append(record)
    return out


def history(recs) -> list[dict]:
    """Each history record as {"_step": n, key: value...} (values decoded from their JSON)."""
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            row.setdefault("_step", r.history.step.num)
            rows.append(row)
    return rows


def of_kind(recs, kind: str) -> list:
    return [getattr(r, kind) for r in recs if r.WhichOneof("record_type") == kind]
