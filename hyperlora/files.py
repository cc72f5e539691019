"""Atomic writes: a reader (or a resumed run) sees a whole old file or a whole new one, never half of either."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LATEST = "latest"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere os.umask is the only way to read it, by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_directory(parent: Path, name: str) -> Path:
    """A new hidden ``.NAME.XXXX.tmp`` folder in ``parent`` to be renamed into place, with the permissions mkdir
    would give it (mkdtemp's are 0700: the published folder would be private)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def check_sha256(folder: Path, digests: dict[str, str], record: str) -> None:
    """Refuse, by name, a file of ``folder`` that is missing or differs from the SHA-256 that ``record`` holds."""
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {record} in {folder} was saved together with it")
        if sha256(path) != digest:
            raise ValueError(
                f"{path} does not match the SHA-256 recorded in {record}: it is truncated or corrupted, "
                "or it comes from a different save"
            )


def _jsonable(value: Any) -> Any:
    """NaN and Inf become null: strict JSON readers reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~umask())  # as open() would create it, not mkstemp's 0600
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_directory(path.parent, path.name)
    try:
        yield tmp
        mode = 0o666 & ~umask()
        for file in tmp.rglob("*"):
            if file.is_file():
                file.chmod(mode)  # safetensors writes 0600 whatever the umask
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None when no checkpoint was completed."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist: the checkpoint folder was edited")
    return path


def publish_checkpoint(root: str | Path, name: str) -> None:
    """Point ``latest`` at a finished checkpoint, then drop the older ones and what killed runs left half-written."""
    root = Path(root)
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
        elif old.is_file() and old.name != LATEST:  # e.g. a .latest.*.tmp from a run killed while writing it
            old.unlink(missing_ok=True)
