"""Atomic file writes (an output exists whole or not at all), UTF-8 input reads, output-path checks."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from pmvis.core.errors import PmvisError

# Mode of a new regular file before the umask is applied (what open() and shells use).
NEW_FILE_MODE = 0o666


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be read
    by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the destination directory so the final ``os.replace`` is an
    atomic rename on the same filesystem. mkstemp creates it 0600; it gets the mode an ordinary
    new file would have (0666 less the umask) before the rename, so outputs are as readable as
    any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, NEW_FILE_MODE & ~_current_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
    """Serialise first, then write: a serialisation error leaves any existing file untouched.

    NaN and infinities are refused (``Infinity`` is not JSON; other readers reject the file):
    callers validate numbers at their source, so reaching this is a bug, reported with the path.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: not written: {e}") from None
    write_text_atomic(path, text)


def read_text_utf8(path: str | os.PathLike) -> str:
    """A UTF-8 text input file; missing, unreadable or non-UTF-8 is a PmvisError naming the file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PmvisError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise PmvisError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise PmvisError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PmvisError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON input file; undecodable bytes, bad syntax, numbers Python refuses and absurd
    nesting are PmvisErrors naming the file (JSON is UTF-8 by RFC 8259, whatever the locale)."""
    text = read_text_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PmvisError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except ValueError as e:  # e.g. an integer literal longer than sys.get_int_max_str_digits()
        raise PmvisError(f"{path}: malformed JSON: {e}") from None
    except RecursionError:
        raise PmvisError(f"{path}: malformed JSON: nested too deeply") from None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard links too), else the
    same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_file(out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      input_dirs: Iterable[str | os.PathLike] = (), flag: str = "--out") -> None:
    """Refuse an output path that cannot be written as a file or would overwrite an input.

    ``inputs`` are files the output must not replace; ``input_dirs`` are directories (e.g. a
    dataset's frames) that no output may be written into. Called before any work starts, so a bad
    path costs nothing.
    """
    out = Path(out)
    if out.is_dir():
        raise PmvisError(f"{flag} {out}: is a directory; {flag} must be a file path")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise PmvisError(f"{flag} {out}: {parent} is not a directory, so nothing can be written under it")
            break
    for f in inputs:
        if _same_file(out, Path(f)):
            raise PmvisError(f"{flag} {out}: would overwrite the input file {f}; choose another {flag}")
    real_out = os.path.realpath(out)
    for d in input_dirs:
        real_dir = os.path.realpath(d)
        if os.path.commonpath([real_out, real_dir]) == real_dir:
            raise PmvisError(f"{flag} {out}: lies inside the input directory {d}; choose another {flag}")
