"""Write files so that a crash never leaves half a file: a temporary file beside the target, then a rename.

Temporary files and folders are created with ``os.open(..., 0o666)`` and ``os.mkdir(..., 0o777)``, so the
kernel applies the user's umask (and default ACLs) exactly as for any other new file: under the usual umask
022 results are 0644/0755 like stock nnU-Net's, never the 0600/0700 of ``tempfile.mkstemp``/``mkdtemp``.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import IO, Any, Callable


def _temp_name(folder: str, prefix: str, suffix: str) -> str:
    return os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")


def make_temp_dir(folder: str, prefix: str) -> str:
    """A new, uniquely named folder in ``folder`` with the permissions the user's umask gives new folders."""
    while True:
        path = _temp_name(folder, prefix, "")
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def _write_atomically(path: str, mode: str, write: Callable[[IO], None]) -> None:
    """Create a temporary file beside ``path`` (umask applies), ``write`` into it, then rename onto ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = _temp_name(folder, "." + os.path.basename(path) + ".", ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` (folders created) through a temporary file and os.replace."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomically(path, "w", lambda f: f.write(text))


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a checkpoint."""
    import torch

    _write_atomically(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str, indent: int = 2) -> None:
    """JSON version of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save_figure(fig: Any, path: str, dpi: int = 110, **kwargs: Any) -> str:
    """``fig.savefig`` (a matplotlib figure) through a temporary file and os.replace, folders created; the
    format comes from the file name's suffix (default png). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    _write_atomically(path, "wb", lambda f: fig.savefig(f, dpi=dpi, format=fmt, **kwargs))
    return path
