"""submit_deck: a generated multi-page PDF becomes the DESIGN.md task graph; bad files write nothing;
the PDF lands in the document store under its content name and payloads name it relative to it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import asyncpg
import pytest
from fpdf import FPDF

from gpuscale.queue import Priority, Queue
from gpuscale.queue.deck import DeckError, page_batches, submit_deck
from gpuscale.queue.documents import DocumentStore


def make_pdf(path: Path, pages: int) -> Path:
    pdf = FPDF()
    pdf.set_font("helvetica", size=24)
    for i in range(pages):
        pdf.add_page()
        pdf.cell(text=f"Slide {i + 1}")
    pdf.output(str(path))
    return path


@pytest.fixture
def store(tmp_path: Path) -> DocumentStore:
    return DocumentStore(tmp_path / "documents")


def test_page_batches() -> None:
    assert page_batches(1, 8) == [(1, 1)]
    assert page_batches(8, 8) == [(1, 8)]
    # As few batches as needed, as even as possible: no short last batch paying a cold start.
    assert page_batches(19, 8) == [(1, 7), (8, 13), (14, 19)]
    assert page_batches(28, 10) == [(1, 10), (11, 19), (20, 28)]
    assert page_batches(30, 10) == [(1, 10), (11, 20), (21, 30)]
    assert page_batches(31, 10) == [(1, 8), (9, 16), (17, 24), (25, 31)]


async def test_graph_shape(db: asyncpg.Pool, tmp_path: Path, store: DocumentStore) -> None:
    q = Queue(db)
    pdf = make_pdf(tmp_path / "deck.pdf", 19)
    sub = await submit_deck(q, pdf, store=store, priority="high", batch_pages=8)
    assert sub.pages == 19 and sub.document == f"{hashlib.sha256(pdf.read_bytes()).hexdigest()}.pdf"
    assert store.resolve(sub.document).read_bytes() == pdf.read_bytes()
    ids = sub.task_ids
    batches = ids["visual_analysis"]
    assert len(batches) == 3
    assert sorted(ids) == sorted(
        [
            "visual_analysis",
            "slide_feedback",
            "company_offering_extraction",
            "startup_name_extraction",
            "healthcare_classification",
            "funding_amount_extraction",
            "deck_date_extraction",
            "template_analysis",
            "specialized_clinical",
            "specialized_regulatory",
            "specialized_science",
        ]
    )
    rows = {
        r["id"]: r
        for r in await db.fetch(
            """SELECT q.*, ARRAY(SELECT d.depends_on FROM processing_task_deps d
                                  WHERE d.task_id = q.id) AS depends_on
                 FROM processing_queue q"""
        )
    }
    assert len(rows) == 3 + 1 + 5 + 1 + 3
    for r in rows.values():
        assert r["document_id"] == sub.document_id and r["priority"] == "high"
    firsts = [rows[b]["payload"]["first_page"] for b in batches]
    assert sorted(int(str(f)) for f in firsts) == [1, 8, 14]
    last = await q.get_task(batches[-1])
    assert last is not None and last["payload"] == {
        "document": sub.document,
        "first_page": 14,
        "last_page": 19,
    }
    assert last["status"] == "queued" and last["pool"] == "visual"

    def deps(name: str) -> list[int]:
        return sorted(rows[ids[name][0]]["depends_on"])

    assert deps("slide_feedback") == sorted(batches)
    for name in ("company_offering_extraction", "healthcare_classification", "deck_date_extraction"):
        assert deps(name) == sorted(batches) and rows[ids[name][0]]["status"] == "blocked"
        assert rows[ids[name][0]]["pool"] == "text"
    assert deps("template_analysis") == ids["healthcare_classification"]
    for name in ("specialized_clinical", "specialized_regulatory", "specialized_science"):
        assert deps(name) == ids["template_analysis"]

    # Running the visual batches releases the six tasks that wait for them, and only those.
    claimed = await q.claim("visual", "v", 10)
    assert sorted(c.id for c in claimed) == sorted(batches)
    await q.complete_many("v", [(c.id, {"slides": []}) for c in claimed])
    text = await q.claim("text", "t", 100)
    assert sorted(t.task_type for t in text) == sorted(
        [
            "company_offering_extraction",
            "startup_name_extraction",
            "healthcare_classification",
            "funding_amount_extraction",
            "deck_date_extraction",
        ]
    )
    assert all(t.priority is Priority.high for t in text)
    (fb,) = await q.claim("visual", "v", 10)
    assert fb.task_type == "slide_feedback"


async def test_batch_pages_option(db: asyncpg.Pool, tmp_path: Path, store: DocumentStore) -> None:
    sub = await submit_deck(Queue(db), make_pdf(tmp_path / "d.pdf", 5), store=store, batch_pages=2)
    assert len(sub.task_ids["visual_analysis"]) == 3
    # The default: at most 10 pages a batch (a 19-page deck is two batches of 10 and 9).
    sub = await submit_deck(Queue(db), make_pdf(tmp_path / "e.pdf", 19), store=store)
    assert len(sub.task_ids["visual_analysis"]) == 2


async def test_resubmission_reuses_the_stored_copy(
    db: asyncpg.Pool, tmp_path: Path, store: DocumentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same bytes, same stored file (no duplicate, no leftover temporary files), from any folder."""
    pdf = make_pdf(tmp_path / "d.pdf", 3)
    first = await submit_deck(Queue(db), pdf, store=store)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "copy.pdf").write_bytes(pdf.read_bytes())
    monkeypatch.chdir(elsewhere)
    second = await submit_deck(Queue(db), Path("copy.pdf"), store=store)
    assert first.document == second.document and first.document_id != second.document_id
    assert sorted(os.listdir(store.root)) == [first.document]
    other = await submit_deck(Queue(db), make_pdf(tmp_path / "e.pdf", 4), store=store)
    assert other.document != first.document and len(os.listdir(store.root)) == 2


async def test_size_limit_refuses_and_stores_nothing(
    db: asyncpg.Pool, tmp_path: Path, store: DocumentStore
) -> None:
    pdf = make_pdf(tmp_path / "d.pdf", 3)
    with pytest.raises(DeckError, match="over the 1024-byte limit"):
        await submit_deck(Queue(db), pdf, store=store, max_bytes=1024)
    assert not store.root.exists() or os.listdir(store.root) == []
    assert await db.fetchval("SELECT count(*) FROM processing_queue") == 0


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"hello, I am a text file\n", "not a PDF"),
        (b"%PDF-1.7\n this is not really a pdf at all \n%%EOF", "corrupt"),
        (None, "no such file"),
    ],
)
async def test_bad_files_refused(
    db: asyncpg.Pool, tmp_path: Path, store: DocumentStore, content: bytes | None, words: str
) -> None:
    path = tmp_path / "bad.pdf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DeckError, match=words):
        await submit_deck(Queue(db), path, store=store)
    assert await db.fetchval("SELECT count(*) FROM processing_queue") == 0
    assert not store.root.exists() or os.listdir(store.root) == []


async def test_truncated_pdf_refused(db: asyncpg.Pool, tmp_path: Path, store: DocumentStore) -> None:
    good = make_pdf(tmp_path / "good.pdf", 3).read_bytes()
    bad = tmp_path / "truncated.pdf"
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(DeckError):
        await submit_deck(Queue(db), bad, store=store)
    with pytest.raises(DeckError, match="batch_pages"):
        await submit_deck(Queue(db), tmp_path / "good.pdf", store=store, batch_pages=0)
    assert await db.fetchval("SELECT count(*) FROM processing_queue") == 0
