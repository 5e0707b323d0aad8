"""Atomic writes (temp file + rename) and reads that fail with the file's name and what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor


def write_json(path: str | Path, data: object) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err}); delete it to rebuild") from err


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic ``safetensors`` write; refuses NaN or infinite values."""
    path = Path(path)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to write {path}: tensor {name!r} has NaN or infinite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def open_tensors(path: str | Path):
    """``safe_open`` with an error that names the file when it is corrupt or truncated."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err}); delete it to rebuild") from err


def load_tensors(path: str | Path, check_finite: bool = True) -> dict[str, Tensor]:
    """Read every tensor of a safetensors file, checking it is whole and finite."""
    path = Path(path)
    f = open_tensors(path)
    try:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err}); delete it to rebuild") from err
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{path}: tensor {name!r} has NaN or infinite values")
    return tensors


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Atomic text write."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomic binary write (a figure, say)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def file_hash(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes, read in chunks (an annotation file may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
