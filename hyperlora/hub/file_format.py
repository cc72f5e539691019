"""The task-embeddings files: their names, reading and validating the JSON header and its contents, atomic writes.

A set is ``task_embeddings.safetensors`` (one float32 tensor under ``TENSOR_KEY``) and ``task_embeddings.json``;
only those two names are ever read, and only as safetensors and JSON. The README card is marked with
``_CARD_MARKER`` so that a card written here can be told from one that is not ours.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

EMBEDDINGS_FILE = "task_embeddings.safetensors"
CONFIG_FILE = "task_embeddings.json"
TENSOR_KEY = "task_embeddings"
FORMAT = "hyperlora-task-embeddings"
FORMAT_VERSION = 1
# The only names ever read from or written to a folder or a repo: nothing else can be fetched, nothing can escape.
_DOWNLOADED = (CONFIG_FILE, EMBEDDINGS_FILE)
_CARD_MARKER = "<!-- hyperlora-task-embeddings -->"


def _check_h_scores(h_scores: Any, num_tasks: int) -> list[list[float | None]]:
    if hasattr(h_scores, "tolist"):  # numpy array or tensor
        h_scores = h_scores.tolist()
    if not isinstance(h_scores, list | tuple) or len(h_scores) != num_tasks:
        raise ValueError(f"h_scores must be a {num_tasks} x {num_tasks} matrix (one row per task)")
    rows: list[list[float | None]] = []
    for i, row in enumerate(h_scores):
        if not isinstance(row, list | tuple) or len(row) != num_tasks:
            raise ValueError(
                f"h_scores must be a {num_tasks} x {num_tasks} matrix; row {i} is not of length {num_tasks}"
            )
        clean: list[float | None] = []
        for j, value in enumerate(row):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                clean.append(None)
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                clean.append(float(value))
            else:
                raise ValueError(f"h_scores[{i}][{j}] must be a finite number or None, got {value!r}")
        rows.append(clean)
    return rows


def _json_safe(value: Any) -> Any:
    """Sets become sorted lists, tuples lists, enums their value: what JSON can hold and compare reliably."""
    if isinstance(value, Enum):
        return _json_safe(value.value)
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_json_safe(item) for item in value), key=repr)
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)


def _read_bytes(path: Path, source: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{source} has no {path.name}: not a HyperLoRA task-embeddings folder") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def _read_header(path: Path, source: str) -> dict[str, Any]:
    raw = _read_bytes(path, source)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{CONFIG_FILE} in {source} is corrupted or truncated (not valid JSON: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{CONFIG_FILE} in {source} is not a HyperLoRA task-embeddings file")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{CONFIG_FILE} in {source} has format_version {version!r}; this hyperlora reads up to {FORMAT_VERSION}: "
            "upgrade hyperlora"
        )
    missing = [k for k in ("num_tasks", "task_embedding_dim", "task_names", "h_scores", "config") if k not in header]
    if missing:
        raise ValueError(f"{CONFIG_FILE} in {source} lacks {', '.join(missing)}")
    return header


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
