"""Small file helpers shared by every stage: atomic writes (temp file + rename, so a crash never leaves
a half-written file), owner-only permissions for private chat data, bounded reading of user-given text
files, and names that can never become paths.

A process killed mid-write (SIGKILL, power loss) leaves at most a temporary `.NAME.PID.*.tmp` beside
the target, owner-only; the next atomic write to the same target removes those whose process is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from convsim.errors import UserError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
MAX_TEXT_BYTES = 64 << 20  # a config, history, phrases or pairs file larger than this is not one


def private_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) if needed and make it owner-only."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, PRIVATE_DIR)
    return p


def make_parents(path: str | os.PathLike) -> Path:
    """Create the missing parents of `path` owner-only (existing ones are left as they are)."""
    parent = Path(path).parent
    missing = []
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            pass
    return Path(path).parent


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: str | os.PathLike) -> int:
    """Remove `.NAME.PID.*.tmp` (files or directories) left beside `target` by a killed process whose
    PID is no longer running; returns how many were removed. Temporaries of live processes are kept."""
    target = Path(target)
    pattern = re.compile(r"^\." + re.escape(target.name) + r"\.(\d+)\..*\.tmp$")
    removed = 0
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return 0
    for e in entries:
        m = pattern.match(e.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
            removed += 1
        except OSError:
            pass
    return removed


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextmanager
def atomic_path(path: str | os.PathLike, private: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On an exception the temporary file is removed and `path` is left as it was. The temporary file is
    owner-only from its creation (mkstemp), so private data is never readable by others, even mid-write.
    """
    target = Path(path)
    make_parents(target)
    clean_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, PRIVATE_FILE if private else 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str, private: bool = True) -> None:
    with atomic_path(path, private) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, private: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", private)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], private: bool = True) -> int:
    n = 0
    with atomic_path(path, private) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (old one removed).

    Where the OS can swap two directories in one step (Linux renameat2), `path` is at every moment
    either the old directory or the new one. Elsewhere the old one is first renamed to `.NAME.old`
    and a crash between the two renames is repaired by the next atomic_dir on the same path.
    """
    target = Path(path)
    make_parents(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():  # a crash between the two fallback renames
        os.replace(old, target)
    clean_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            return
        if target.exists() or target.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
            _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_user_text(path: str | os.PathLike, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a user-given file (a config, history, phrases or pairs file), or a `UserError`
    that says why not: missing, not a regular file (a FIFO or device would block or never end), larger
    than `max_bytes`, binary, or not UTF-8."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{what} {p} not found") from None
    except OSError as e:
        raise UserError(f"{what} {p}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {p} is not a regular file")
    if st.st_size > max_bytes:
        raise UserError(
            f"{what} {p} is {st.st_size / (1 << 20):.0f} MiB, more than the {max_bytes >> 20} MiB "
            "a file of this kind may be"
        )
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UserError(f"{what} {p}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise UserError(f"{what} {p} is larger than {max_bytes >> 20} MiB")
    if b"\0" in data[:8192]:
        raise UserError(f"{what} {p} is binary, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p}: not UTF-8 text (bad byte at offset {e.start})") from None


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_name(name: str) -> str:
    """A file-system-safe version of a user-given name (speaker, experiment): never a path.

    Only letters, digits, `-`, `_` and inner `.` survive (no `/`, `\\`, `..`, NUL, leading dot); a name
    that had to change gets a short hash of the original, so two different names never share a file.
    """
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip(".")
    keep = re.sub(r"\.{2,}", ".", keep)[:80] or "_"
    if keep != name or keep.split(".")[0].upper() in _RESERVED:
        keep = f"{keep[:71]}-{hashlib.sha256(str(name).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return keep
