"""Config hashes: what produced a row or a checkpoint, so a rerun recomputes exactly what changed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path


def identity(part):
    """The JSON-able form of one hashed part: a dataclass's ``hash_identity()`` where it defines one (what
    determines its results, e.g. a user family's file content rather than where the file lies), else
    its fields; anything else as it is."""
    if is_dataclass(part) and not isinstance(part, type):
        return part.hash_identity() if hasattr(part, "hash_identity") else asdict(part)
    return part


def config_hash(*parts) -> str:
    """sha256 (16 hex digits) of JSON-able parts (dataclasses by `identity`)."""
    plain = [identity(p) for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=list).encode()).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
