"""The one walk over a site folder: which entries medgen may open, and what each file holds.

Every reader of a site's files goes through here: the site loader (data/site_records.py),
the cache key (data/cache.py), ``data check`` (data/data_check.py) and the DICOM scan
of a series folder (data/dicom/scan.py). So what ``data check`` calls usable is exactly
what trains, and no part of medgen follows a link or opens a pipe that another refuses.

The rules, and why:
- **No symbolic link below the site folder is followed** (file or folder): it is skipped
  and named. A link can leave the folder (training on files the hospital did not put
  there), point back into it (``images/loop -> .`` repeats every patient once per level,
  and one patient counted k times weakens the per-patient guarantee k-fold) or make one
  file appear under two names. Refusing links keeps "one file on disk = at most one
  record" true without resolving anything. The site folder itself (the path the node is
  given) may be a link: the hospital chose it.
- **Only regular files are opened.** A FIFO, socket or device is named and skipped from
  its ``lstat`` alone: opening a FIFO blocks until someone writes to it, forever.
  ``open_regular`` also opens with O_NOFOLLOW | O_NONBLOCK and re-checks the opened file,
  so an entry swapped between the listing and the read cannot hang or redirect it.
- **A file that cannot be read is skipped and named** (a node need not run as root):
  every listed file is read once here (its content digest keys the cache), so a
  PermissionError surfaces here, per file, never as a crash of the whole site.
- A folder reached twice (a bind mount loop: same device and inode) is walked once.
- Names starting with "." (.DS_Store, editor swap files) are ignored silently.

Reasons name entries by their path relative to the site folder (the hospital's own paths,
for its local logs; never sent anywhere). Nothing is ever written.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

LINK_REASON = ("symbolic link, not followed: medgen reads no links inside a site folder (a link "
               "can leave the folder or count a patient twice); put the file or folder itself here")


class NotRegularFile(OSError):
    """An entry that is not a regular file was about to be opened."""


def entry_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def not_regular_reason(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return LINK_REASON
    return (f"a {entry_kind(mode)}, not a regular file: never opened (reading it could block "
            "the node forever); remove it from the site folder")


def unreadable_reason(err: OSError) -> str:
    why = err.strerror or type(err).__name__
    return (f"cannot be read ({why}); give the user the node runs as read access, or move the "
            "file out of the site folder")


def open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (never a link, pipe or device)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path.name} is a {entry_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_digest(path: Path) -> str:
    """blake2b of the content of the regular file ``path``."""
    digest = hashlib.blake2b(digest_size=16)
    with open_regular(path) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    """One entry met by ``walk``: a folder, a regular file, or something skipped and why."""

    path: Path
    kind: str        # "dir" | "file" | "skip"
    reason: str = ""
    size: int = 0


def walk(top: Path) -> Iterator[Entry]:
    """Every entry under the folder ``top`` (not ``top`` itself), depth first, sorted by name.

    Links and special files come out as "skip" entries with their reason and are never
    opened or entered; folders come out before their contents. Readability is not checked
    here (``file_digest`` or the reader opening the file finds it).
    """
    try:
        top_stat = os.stat(top)
    except OSError:
        return
    yield from _walk(top, {(top_stat.st_dev, top_stat.st_ino)})


def _walk(folder: Path, seen: set[tuple[int, int]]) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        yield Entry(folder, "skip", f"folder cannot be listed ({err.strerror}); give the node's "
                                    "user read and execute access")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError as err:
            yield Entry(path, "skip", unreadable_reason(err))
            continue
        if stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                yield Entry(path, "skip", "the same folder as one already read (a mount loop); "
                                          "read once")
                continue
            seen.add((info.st_dev, info.st_ino))
            yield Entry(path, "dir")
            yield from _walk(path, seen)
        elif stat.S_ISREG(info.st_mode):
            yield Entry(path, "file", size=info.st_size)
        else:
            yield Entry(path, "skip", not_regular_reason(info.st_mode))


def regular_files(top: Path) -> Iterator[Entry]:
    """``walk`` without the folders: the files to try and the entries skipped."""
    return (e for e in walk(top) if e.kind != "dir")


@dataclass(frozen=True)
class FileFacts:
    size: int
    digest: str


@dataclass
class SiteFolder:
    """The listing of some folders of a site: every readable regular file with its digest,
    the folder tree (for readers to claim entries in) and every entry skipped, with why.

    ``folders`` are names under ``root`` ("images", "labels", or "." for ``root`` itself);
    one that is absent is listed as empty; one that is a link or not a folder is skipped.
    """

    root: Path
    folders: tuple[str, ...]
    present: set[str] = field(default_factory=set)           # folders that exist and were walked
    files: dict[str, FileFacts] = field(default_factory=dict)  # relpath -> facts
    children: dict[str, list[str]] = field(default_factory=dict)  # folder relpath -> entries
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)

    @classmethod
    def scan(cls, root: str | os.PathLike, folders: tuple[str, ...]) -> "SiteFolder":
        site = cls(Path(root), tuple(folders))
        for name in site.folders:
            site._scan_folder(name)
        return site

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    def is_dir(self, relpath: str) -> bool:
        return relpath in self.children

    def _scan_folder(self, name: str) -> None:
        top = self.root if name == "." else self.root / name
        try:
            info = os.lstat(top)
        except FileNotFoundError:
            return
        except OSError as err:
            self.skipped.append((name, unreadable_reason(err)))
            return
        if not stat.S_ISDIR(info.st_mode):
            self.skipped.append((name, not_regular_reason(info.st_mode)
                                 if not stat.S_ISREG(info.st_mode) else "a file, expected a folder"))
            return
        self.present.add(name)
        self.children.setdefault(self.relative(top) if name != "." else ".", [])
        for entry in walk(top):
            rel = self.relative(entry.path)
            parent = self.relative(entry.path.parent) if entry.path.parent != self.root else "."
            if entry.kind == "skip":
                self.skipped.append((rel, entry.reason))
                continue
            if entry.kind == "dir":
                self.children[rel] = []
            else:
                try:
                    self.files[rel] = FileFacts(entry.size, file_digest(entry.path))
                except OSError as err:
                    reason = str(err) if isinstance(err, NotRegularFile) else unreadable_reason(err)
                    self.skipped.append((rel, reason))
                    continue
            self.children.setdefault(parent, []).append(rel)

    def files_under(self, relpath: str) -> list[str]:
        """Every listed file at or below ``relpath`` (a file or a folder), in walk order."""
        if relpath in self.files:
            return [relpath]
        found: list[str] = []
        for child in self.children.get(relpath, []):
            found.extend(self.files_under(child))
        return found

    def content_digest(self, relpath: str) -> str:
        """One digest of the bytes at or below ``relpath`` (names below it included)."""
        digest = hashlib.blake2b(digest_size=16)
        prefix = "" if relpath == "." else relpath + "/"
        for rel in self.files_under(relpath):
            digest.update(f"{rel[len(prefix):] if rel != relpath else ''}\0{self.files[rel].digest}\0".encode())
        return digest.hexdigest()
