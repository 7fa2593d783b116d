"""The storage root: a local folder or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Every stage reads and writes artifacts below one root (`prompts/`, `exemplars/`, `checkpoints/`,
`reports/`), so a stage can run alone, on another node, or after a crash. Paths are strings joined
with "/"; `resolve` returns the pyarrow filesystem and the path inside it, which Ray Data's readers
and writers accept as `filesystem=`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.fs as pafs


def is_uri(root: str) -> bool:
    return "://" in root


def join(root: str, *parts: str) -> str:
    out = root.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def delete_dir(path: str) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def write_json(path: str, obj: Any) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p, compression=None) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: str) -> Any:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as f:
        return json.loads(f.read().decode())


def write_text(path: str, text: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p, compression=None) as f:
        f.write(text.encode())
