"""Command-line SRC arguments → the bytes of each export, read into memory with bounds.

    blobs = read_sources(["WhatsApp Chat.zip", "tg/ChatExport_2024-01-01", "chitchat"], max_bytes=1 << 30)

A SRC is a file, a directory (searched for exports, symlinks not followed), a `.zip` (its entries read
in memory, never extracted), or the word `chitchat` (the installed chitchat-dataset). An SQLite file
given directly brings its `-wal` file along when one lies beside it (bundles.py pairs them). Refused with a
`UserError`: a path that is not a regular file (a FIFO, a device, a symlink loop), a zip entry whose
path leaves the archive (`../x`, `/etc/x`, `C:\\x`), an encrypted or corrupt zip, and anything that
would make the total read exceed `max_bytes` (zip bombs: declared sizes are checked before reading and
reads are capped). Nested zips are not opened. Each blob knows its container (a directory or zip) so
the caller can say "no chat export in X" when none of a container's files turns out to be one.
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from convsim.errors import UserError

CHAT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".db", ".db-wal", ".sqlite", ".sqlite-wal")
MAX_FILES = 10_000
MAX_DEPTH = 8


@dataclass
class Blob:
    name: str  # shown in sources and errors: "chat.zip/_chat.txt"
    data: bytes
    container: str | None = None  # the directory or zip it came from; None for a file given directly
    fmt: str | None = None  # a format fixed by how it was named (the word `chitchat`)
    companions: dict[str, bytes] | None = None  # files read with this one (a chat.db's WAL; a Slack export's files)


class _Budget:
    def __init__(self, max_bytes: int):
        self.left = max_bytes
        self.max = max_bytes

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise UserError(
                f"{what}: reading it would pass the {self.max // (1 << 20)} MiB input limit "
                "(--max-input-mb); a zip bomb or not a chat export?"
            )
        self.left -= n


def read_sources(srcs: list[str], max_bytes: int) -> list[Blob]:
    budget = _Budget(max_bytes)
    out: list[Blob] = []
    for src in srcs:
        if src == "chitchat" and not os.path.lexists(src):
            from convsim.data.importers.chitchat import dataset_path

            path = dataset_path()
            out.append(Blob("chitchat", _read_file(path, budget, "chitchat"), fmt="chitchat"))
            continue
        st = _stat(src)
        if stat.S_ISDIR(st.st_mode):
            out.extend(_read_dir(src, budget))
        elif stat.S_ISREG(st.st_mode):
            data = _read_file(src, budget, src)
            name = os.path.basename(os.path.normpath(src)) or src
            if _is_zip(data):
                out.extend(_zip_members(data, name, budget))
                continue
            out.append(Blob(name, data))
            wal = src + "-wal"
            if data.startswith(b"SQLite format 3\0") and os.path.isfile(wal) and not os.path.islink(wal):
                # a database copied with its write-ahead log: the newest rows are only there
                out.append(Blob(name + "-wal", _read_file(wal, budget, wal)))
        else:
            raise UserError(f"{src}: not a regular file or directory (a device, FIFO or socket?)")
    return out


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{path}: a symlink to nothing ({os.readlink(path)!r} does not exist)") from None
        raise UserError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_file(path: str, budget: _Budget, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{what}: not a regular file")
            budget.take(st.st_size, what)
            data = f.read(st.st_size + 1)
    except OSError as e:
        raise UserError(f"{what}: cannot read ({e.strerror or e})") from None
    if len(data) > st.st_size:  # grew while reading
        raise UserError(f"{what}: the file changed while being read")
    return data


def _is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _read_dir(root: str, budget: _Budget) -> list[Blob]:
    out: list[Blob] = []
    seen = 0
    html = False
    base = os.path.normpath(root)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False, onerror=None):
        depth = os.path.relpath(dirpath, base).count(os.sep) + (dirpath != base)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < MAX_DEPTH else []
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            path = os.path.join(dirpath, fn)
            low = fn.lower()
            html |= low.endswith(".html")
            if not (low.endswith(CHAT_SUFFIXES) or low.endswith(".zip")):
                continue
            if os.path.islink(path):
                continue
            seen += 1
            if seen > MAX_FILES:
                raise UserError(f"{root}: more than {MAX_FILES} candidate files; point SRC at the export itself")
            rel = os.path.relpath(path, base)
            data = _read_file(path, budget, path)
            name = f"{os.path.basename(base)}/{rel}"
            if _is_zip(data):
                members = _zip_members(data, name, budget, optional=True)
                for b in members:
                    b.container = root
                out.extend(members)
            else:
                out.append(Blob(name, data, container=root))
    if not out:
        hint = " (a Telegram HTML export? export as 'Machine-readable JSON' instead)" if html else ""
        raise UserError(f"{root}: directory without a chat export (no .txt, .json, .jsonl, .csv or .zip file){hint}")
    return out


def _zip_members(data: bytes, name: str, budget: _Budget, optional: bool = False) -> list[Blob]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, NotImplementedError) as e:
        raise UserError(f"{name}: not a readable zip archive ({e})") from None
    if len(infos) > MAX_FILES:
        raise UserError(f"{name}: zip with {len(infos)} entries; too many to be a chat export")
    for info in infos:
        _check_entry_path(info.filename, name)
    picked = [i for i in infos if _is_chat_entry(i)]
    declared = sum(i.file_size for i in picked)
    if declared > budget.left:
        raise UserError(
            f"{name}: its chat entries would unpack to {declared / (1 << 20):.0f} MiB, past the "
            f"{budget.max // (1 << 20)} MiB input limit (--max-input-mb); refusing a possible zip bomb"
        )
    out = []
    for info in picked:
        what = f"{name}/{info.filename}"
        if info.flag_bits & 0x1:
            raise UserError(f"{what}: encrypted zip entry; password-protected exports are not supported")
        try:
            with zf.open(info) as f:
                chunk = f.read(budget.left + 1)
        except RuntimeError as e:  # encrypted in a way the flag did not say
            raise UserError(f"{what}: cannot read ({e})") from None
        except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError, ValueError) as e:
            raise UserError(f"{what}: corrupt zip entry ({e})") from None
        except Exception as e:  # zlib/bz2/lzma decoder errors have no common base class
            raise UserError(f"{what}: corrupt zip entry ({type(e).__name__}: {e})") from None
        budget.take(len(chunk), what)
        out.append(Blob(what, chunk, container=name))
    if not out and not optional:
        listing = ", ".join(i.filename for i in infos[:6]) or "nothing"
        nested = (
            " (zips inside a zip are not opened)" if any(i.filename.lower().endswith(".zip") for i in infos) else ""
        )
        raise UserError(
            f"{name}: zip without a chat export (entries: {listing}{' ...' if len(infos) > 6 else ''}){nested}"
        )
    return out


def _check_entry_path(entry: str, name: str) -> None:
    p = entry.replace("\\", "/")
    parts = PurePosixPath(p).parts
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in parts or "\x00" in p:
        raise UserError(f"{name}: zip entry {entry!r} has a path outside the archive; refusing this zip")


def _is_chat_entry(info: zipfile.ZipInfo) -> bool:
    fn = info.filename
    base = fn.rsplit("/", 1)[-1]
    if info.is_dir() or fn.startswith("__MACOSX/") or base.startswith("."):
        return False
    if stat.S_ISLNK(info.external_attr >> 16):
        return False
    return base.lower().endswith(CHAT_SUFFIXES)
