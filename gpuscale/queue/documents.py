"""The document store: deck PDFs on a filesystem every worker mounts (on Verda, the shared SFS).

A submitted PDF is copied under the document root with a name derived from its content (its
SHA-256), written to a temporary file in the same directory and renamed into place, so a reader
never sees half a file and a resubmission of the same bytes reuses the stored copy.  Task payloads
name the document *relative to the root*; each process resolves that name under its own mount of
the root (the API's and the replicas' mount points may differ) and refuses any name that would
leave it: absolute paths, ``..`` components, symlinks that point outside.  An ``http(s)`` URL is
left as it is: the workers download it themselves.

Stored PDFs are pruned (:meth:`DocumentStore.prune`) once no task names them and they have not
been written or resubmitted for the document retention; half-written uploads left by a crash go
after a day.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit

_CHUNK = 1 << 20
_TMP_PREFIX = ".incoming-"
_NAME_MAX = 255  # bytes per path component (ext4, XFS, NFS)
_PATH_MAX = 4096 - 256  # bytes of the whole name, leaving room for the root it is joined to
_STALE_INCOMING_S = 86400.0  # an upload is written within seconds; one this old was abandoned


class DocumentRefused(ValueError):
    """A document name or upload was refused (escapes the root, too large, unreadable)."""


def is_url(document: str) -> bool:
    return urlsplit(document).scheme in ("http", "https")


class DocumentStore:
    """Content-addressed PDFs under ``root``; see the module docstring."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    # ------------------------------------------------------------------ reading

    def resolve(self, name: str) -> Path:
        """The path of document ``name`` under this root; :class:`DocumentRefused` if the name is
        absolute, climbs with ``..``, or resolves (through symlinks) to somewhere outside the root."""
        if not name or "\0" in name:
            raise DocumentRefused("empty or malformed document name")
        pure = PurePosixPath(name)
        if pure.is_absolute():
            raise DocumentRefused(f"{name}: absolute paths are refused; name documents relative to the root")
        if any(part == ".." for part in pure.parts):
            raise DocumentRefused(f"{name}: '..' is refused in document names")
        try:
            encoded = os.fsencode(name)
        except UnicodeEncodeError:
            # Lone surrogates (a JSON "\udXXX" escape) have no bytes on a filesystem.
            raise DocumentRefused("the document name is not valid text") from None
        # Over the filesystem's limits is the name's fault; left to stat() it would be an
        # ENAMETOOLONG that reads like a broken filesystem.
        if len(encoded) > _PATH_MAX or any(len(part) > _NAME_MAX for part in encoded.split(b"/")):
            raise DocumentRefused("the document name is too long for the filesystem")
        root = self.root.resolve()
        path = (root / pure).resolve()
        if path != root and root not in path.parents:
            raise DocumentRefused(f"{name}: resolves outside the document root")
        return path

    # ------------------------------------------------------------------ writing

    def put_file(self, source: Path, *, max_bytes: int | None = None) -> str:
        """Copy ``source`` into the store; returns its name relative to the root."""
        with source.open("rb") as fh:
            return self.put_stream(fh, max_bytes=max_bytes)

    def put_stream(self, fh: BinaryIO, *, max_bytes: int | None = None) -> str:
        return self.put_chunks(iter(lambda: fh.read(_CHUNK), b""), max_bytes=max_bytes)

    def put_chunks(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> str:
        """Write ``chunks`` to a temporary file, then rename it to its content name (atomic on one
        filesystem).  Over ``max_bytes``: :class:`DocumentRefused` and nothing is left behind."""
        tmp = self.begin()
        try:
            for chunk in chunks:
                tmp.write(chunk)
                if max_bytes is not None and tmp.size > max_bytes:
                    raise DocumentRefused(f"the document is over the {max_bytes}-byte limit")
            return tmp.commit()
        finally:
            tmp.discard()

    # ------------------------------------------------------------------ pruning

    def prune(
        self, in_use: Collection[str], *, older_than_s: float, dry_run: bool = False, now: float | None = None
    ) -> PruneResult:
        """Delete the stored documents that no task names (``in_use``) and that nobody wrote or
        resubmitted for ``older_than_s``; and uploads abandoned half-written a day ago.

        Only the top level of the root is looked at: that is where :meth:`put_chunks` writes, and
        anything else there (subfolders, other files) belongs to someone else and is left alone.
        A resubmission touches its stored copy (:meth:`Incoming.commit`), so a document being
        submitted right now is never old enough to go."""
        now = time.time() if now is None else now
        result = PruneResult()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return result
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            is_pdf = entry.name.endswith(".pdf") and len(entry.name) == 68  # <sha256>.pdf
            is_incoming = entry.name.startswith(_TMP_PREFIX)
            if not (is_pdf or is_incoming):
                continue
            st = entry.stat(follow_symlinks=False)
            age = now - st.st_mtime
            if is_incoming:
                gone = age > _STALE_INCOMING_S
            else:
                gone = entry.name not in in_use and age > older_than_s
            if not gone:
                result.kept += 1
                continue
            if not dry_run:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:  # another pruner (a second API replica) was first
                    continue
            result.deleted.append(entry.name)
            result.freed_bytes += st.st_size
        return result

    def begin(self) -> Incoming:
        """A temporary file in the store to stream an upload into (check it, then ``commit``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Incoming(self.root)


@dataclass
class PruneResult:
    """What :meth:`DocumentStore.prune` deleted (or would have, in a dry run) and kept."""

    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: int = 0


class Incoming:
    """An upload being written: ``write`` chunks, check :attr:`path`, then ``commit`` or ``discard``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        self._fh: BinaryIO | None = self.path.open("xb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._fh is not None
        self._fh.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    @property
    def name(self) -> str:
        return f"{self._hash.hexdigest()}.pdf"

    def commit(self) -> str:
        """Move the upload to its content name; the same bytes stored before are reused."""
        self.close()
        name = self.name
        final = self.root / name
        if final.is_file() and final.stat().st_size == self.size:
            self.path.unlink(missing_ok=True)
            # A resubmission makes the stored copy young again: pruning goes by age.
            os.utime(final)
        else:
            os.replace(self.path, final)
        return name

    def discard(self) -> None:
        """Drop the temporary file (a no-op after :meth:`commit`)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)
