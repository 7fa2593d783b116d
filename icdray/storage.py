"""The storage root: a local folder or any pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Every stage reads and writes artifacts below one root (`layout.py` names them), so a stage can run
alone, on another node, or after a crash. Paths are strings joined with "/"; `resolve` returns the
pyarrow filesystem and the path inside it, which Ray Data's readers and writers accept as
`filesystem=`. Credentials and endpoints come from the environment as pyarrow reads them (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for a non-AWS server);
set them before Ray starts so every worker inherits them.
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


def read_text(path: str) -> str:
    fs, p = resolve(path)
    with fs.open_input_stream(p, compression=None) as f:
        return f.read().decode()


def listdir(path: str) -> list[str]:
    """Names of the entries directly under `path` ([] when it does not exist)."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def move_dir(src: str, dst: str) -> None:
    """Move a folder within one filesystem (object stores cannot rename folders: copy, then delete)."""
    fs, s = resolve(src)
    _, d = resolve(dst)
    try:
        fs.move(s, d)
    except (OSError, NotImplementedError):
        fs.create_dir(d, recursive=True)
        pafs.copy_files(s, d, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(s)


def upload_dir(local: str, dest: str, replace: bool = False) -> None:
    """Copy a local folder's files to `dest` (any filesystem), merging with what is there unless `replace`."""
    if replace:
        delete_dir(dest)
    fs, p = resolve(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(src: str, local: str) -> None:
    """Copy a folder from any filesystem into a local folder."""
    fs, p = resolve(src)
    os.makedirs(local, exist_ok=True)
    pafs.copy_files(p, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def stamp(path: str) -> str:
    """Size and modification time of a file: what a local copy of a remote artifact is keyed by."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    return f"{info.size}-{info.mtime_ns}"
