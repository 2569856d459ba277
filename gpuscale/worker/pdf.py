"""Fetching a deck's PDF and rendering its pages to images (pypdfium2).

A document is a name relative to the document root (the worker's mount of the document store,
see :mod:`gpuscale.queue.documents`) or an ``http(s)://`` URL.  A name that escapes the root
(absolute, ``..``, a symlink out) is refused.  Bytes are read up to a size limit and must start
like a PDF; anything else fails the task with the reason and is not retried
(:class:`~gpuscale.worker.errors.DocumentError`).  A network hiccup or a 5xx while downloading
*is* retried.

pdfium is not thread-safe, so all pdfium calls go through one lock and run in a worker thread to
keep the event loop (heartbeats, other tasks) responsive while a page renders.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pypdfium2 as pdfium

from gpuscale.common.pdfium import PDFIUM_LOCK
from gpuscale.queue.documents import DocumentRefused, DocumentStore
from gpuscale.worker.errors import DocumentError, TaskError

PDF_MAGIC = b"%PDF-"


@dataclass(frozen=True)
class RenderedPage:
    page: int  # 1-based
    png: bytes
    width: int
    height: int


def _check_magic(data: bytes, document: str) -> None:
    # The header may follow a little junk (the spec allows up to 1024 bytes before it).
    if PDF_MAGIC not in data[:1024]:
        # Never echo the content: the error is stored and served, and a wrong path (a config
        # file, /proc/self/environ) would leak what it holds.
        raise DocumentError(f"{document}: not a PDF (no %PDF- header)")


async def fetch_pdf(document: str, *, root: Path, max_bytes: int, timeout_s: float = 60.0) -> bytes:
    """The PDF's bytes; ``DocumentError`` for missing, oversized, escaping or non-PDF documents."""
    parts = urlsplit(document)
    if parts.scheme in ("http", "https"):
        data = await _fetch_http(document, max_bytes=max_bytes, timeout_s=timeout_s)
    elif parts.scheme == "":
        try:
            path = DocumentStore(root).resolve(document)
        except DocumentRefused as exc:
            raise DocumentError(str(exc)) from None
        data = await asyncio.to_thread(_read_file, path, max_bytes)
    else:
        raise DocumentError(f"{document}: unsupported document location (use a path or an http(s) URL)")
    if not data:
        raise DocumentError(f"{document}: empty file")
    _check_magic(data, document)
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise DocumentError(f"{path}: not a regular file")
        if size > max_bytes:
            raise DocumentError(f"{path}: {size} bytes is over the {max_bytes}-byte limit")
        with path.open("rb") as fh:
            # Read one byte past the limit in case the file grew after the stat.
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise DocumentError(f"{path}: no such file") from None
    except PermissionError:
        raise DocumentError(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise DocumentError(f"{path}: is a directory") from None
    except OSError as exc:
        # An I/O error on a network mount may be transient.
        raise TaskError(f"{path}: cannot read: {exc.strerror or exc}", retryable=True) from None
    if len(data) > max_bytes:
        raise DocumentError(f"{path}: over the {max_bytes}-byte limit")
    return data


async def _fetch_http(url: str, *, max_bytes: int, timeout_s: float) -> bytes:
    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as resp,
        ):
            if resp.status_code >= 500 or resp.status_code == 429:
                raise TaskError(f"{url}: server answered {resp.status_code}", retryable=True)
            if resp.status_code >= 400:
                raise DocumentError(f"{url}: server answered {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise DocumentError(f"{url}: {declared} bytes is over the {max_bytes}-byte limit")
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                if len(buf) > max_bytes:
                    raise DocumentError(f"{url}: over the {max_bytes}-byte limit")
            return bytes(buf)
    except httpx.TimeoutException:
        raise TaskError(f"{url}: download timed out after {timeout_s:g}s", retryable=True) from None
    except httpx.HTTPError as exc:
        raise TaskError(f"{url}: download failed: {type(exc).__name__}: {exc}", retryable=True) from None
    except (httpx.InvalidURL, ValueError) as exc:
        # Not an HTTPError: a URL that cannot be parsed will never download.
        raise DocumentError(f"{url}: invalid URL ({type(exc).__name__})") from None


class PdfDocument:
    """An open PDF; use as a context manager (``with PdfDocument(data, name) as doc``)."""

    def __init__(self, data: bytes, name: str = "document") -> None:
        self.name = name
        try:
            with PDFIUM_LOCK:
                self._pdf = pdfium.PdfDocument(data)
                self.page_count = len(self._pdf)
        except pdfium.PdfiumError as exc:
            raise DocumentError(f"{name}: not a valid PDF ({exc})") from None

    def close(self) -> None:
        with PDFIUM_LOCK:
            self._pdf.close()

    def __enter__(self) -> PdfDocument:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self, page: int, *, dpi: int, max_side: int = 1600) -> RenderedPage:
        """Render a 1-based page to PNG at ``dpi``, scaled down so no side exceeds ``max_side``."""
        if not 1 <= page <= self.page_count:
            raise DocumentError(f"{self.name}: page {page} out of range 1..{self.page_count}")
        try:
            with PDFIUM_LOCK:
                pdf_page = self._pdf[page - 1]
                try:
                    w_pt, h_pt = pdf_page.get_size()
                    scale = dpi / 72.0
                    longest = max(w_pt, h_pt) * scale
                    if longest > max_side:
                        scale *= max_side / longest
                    bitmap = pdf_page.render(scale=scale)
                    image = bitmap.to_pil()
                finally:
                    pdf_page.close()
        except pdfium.PdfiumError as exc:
            raise DocumentError(f"{self.name}: page {page} cannot be rendered ({exc})") from None
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG", optimize=False)
        return RenderedPage(page=page, png=out.getvalue(), width=image.width, height=image.height)

    async def render_async(self, page: int, *, dpi: int, max_side: int = 1600) -> RenderedPage:
        return await asyncio.to_thread(self.render, page, dpi=dpi, max_side=max_side)


async def open_pdf(data: bytes, name: str) -> PdfDocument:
    return await asyncio.to_thread(PdfDocument, data, name)
