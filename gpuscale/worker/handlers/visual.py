"""Visual pool handlers: ``visual_analysis`` (one page batch) and ``slide_feedback``.

``visual_analysis`` fetches the PDF, renders each page of its batch at the configured DPI and asks
the vision model to describe it, reporting progress page by page.  ``slide_feedback`` reads the
merged descriptions of all batches (its dependencies) and asks for feedback slide by slide; it
needs no image, the descriptions carry what the vision model saw.
"""

from __future__ import annotations

import logging
from typing import Any

from gpuscale.queue.results import (
    PageAnalysis,
    SlideDescription,
    SlideFeedback,
    SlideFeedbackItem,
    SlideFeedbackResult,
    VisualAnalysisResult,
)
from gpuscale.queue.tasktypes import DocumentPayload, VisualAnalysisPayload
from gpuscale.worker.errors import TaskError
from gpuscale.worker.handlers.base import TaskContext, merge_visual_pages, parse_payload
from gpuscale.worker.pdf import fetch_pdf, open_pdf

log = logging.getLogger(__name__)

DESCRIBE_SYSTEM = (
    "You are an analyst at a venture capital fund reading startup pitch decks. You are shown one "
    "slide as an image. Describe it faithfully: read the text exactly as printed, name the charts, "
    "photos, tables and logos you see, and say what the slide is trying to convince an investor of. "
    "Do not invent numbers or names that are not on the slide. Answer only with JSON matching the "
    "given schema."
)

DESCRIBE_PROMPT = (
    "Slide {page} of {count} of the pitch deck '{document}'.\n"
    "Give: a title (the slide's headline), the slide type, a description of 2-5 sentences, the text "
    "printed on the slide, its visual elements, and the key points (claims, numbers) an investor "
    "should notice."
)

FEEDBACK_SYSTEM = (
    "You are an experienced startup coach reviewing a founder's pitch deck slide by slide. Be "
    "specific and constructive: say what works, what is missing or unclear, and how to fix it. "
    "Score the slide from 1 (weak) to 10 (excellent) for clarity and persuasiveness. Answer only "
    "with JSON matching the given schema."
)

FEEDBACK_PROMPT = (
    "Slide {page} of {count} ({slide_type}): {title}\n"
    "What it shows: {description}\n"
    "Text on the slide: {text}\n"
    "Visual elements: {visuals}\n"
    "Key points: {points}\n\n"
    "Give the score, strengths, concrete improvements and two or three sentences of feedback."
)


def _dpi(ctx: TaskContext, requested: int | None) -> int:
    return requested or ctx.settings.pdf_dpi


async def visual_analysis(ctx: TaskContext) -> dict[str, Any]:
    """Describe pages ``first_page..last_page`` of the document, one vision call per page."""
    ollama, model = ctx.require_ollama()
    payload = parse_payload(ctx, VisualAnalysisPayload)
    dpi = _dpi(ctx, payload.dpi)
    await ctx.progress(0.0, "fetching document")
    data = await fetch_pdf(
        payload.document,
        root=ctx.settings.document_root,
        max_bytes=ctx.settings.max_pdf_bytes,
        timeout_s=ctx.settings.fetch_timeout_s,
    )
    pdf = await open_pdf(data, payload.document)
    try:
        last = min(payload.last_page, pdf.page_count)
        wanted = list(range(payload.first_page, last + 1))
        if not wanted:
            # A batch past the end (the deck was shorter than the split assumed): nothing to do,
            # and that is not an error; the merge just finds no pages from this batch.
            log.info(
                "task %s: pages %d-%d beyond the document's %d pages",
                ctx.task_id,
                payload.first_page,
                payload.last_page,
                pdf.page_count,
            )
        pages: list[PageAnalysis] = []
        for n, page in enumerate(wanted, start=1):
            rendered = await pdf.render_async(page, dpi=dpi, max_side=ctx.settings.max_image_side)
            answer = await ollama.chat_structured(
                model,
                SlideDescription,
                system=DESCRIBE_SYSTEM,
                prompt=DESCRIBE_PROMPT.format(
                    page=page, count=pdf.page_count, document=_short(payload.document)
                ),
                images=[rendered.png],
            )
            pages.append(
                PageAnalysis(
                    page=page, image_width=rendered.width, image_height=rendered.height, **answer.model_dump()
                )
            )
            await ctx.progress(100.0 * n / len(wanted), f"page {page} described ({n}/{len(wanted)})")
        result = VisualAnalysisResult(
            document=payload.document,
            first_page=payload.first_page,
            last_page=last,
            page_count=pdf.page_count,
            dpi=dpi,
            model=model,
            pages=pages,
        )
    finally:
        pdf.close()
    return result.model_dump(mode="json")


async def slide_feedback(ctx: TaskContext) -> dict[str, Any]:
    """Feedback per slide from the merged descriptions of the deck's visual batches."""
    ollama, model = ctx.require_ollama()
    payload = parse_payload(ctx, DocumentPayload)
    pages = merge_visual_pages(await ctx.dependency_results())
    if not pages:
        raise TaskError("the visual analysis found no pages in the document", retryable=False)
    items: list[SlideFeedbackItem] = []
    for n, p in enumerate(pages, start=1):
        answer = await ollama.chat_structured(
            model,
            SlideFeedback,
            system=FEEDBACK_SYSTEM,
            prompt=FEEDBACK_PROMPT.format(
                page=p.page,
                count=len(pages),
                slide_type=p.slide_type,
                title=p.title,
                description=p.description,
                text=p.text_content or "(none)",
                visuals="; ".join(p.visual_elements) or "(none)",
                points="; ".join(p.key_points) or "(none)",
            ),
        )
        items.append(SlideFeedbackItem(page=p.page, title=p.title, **answer.model_dump()))
        await ctx.progress(100.0 * n / len(pages), f"feedback on slide {p.page} ({n}/{len(pages)})")
    average = round(sum(i.score for i in items) / len(items), 2) if items else None
    return SlideFeedbackResult(
        document=payload.document, model=model, slides=items, average_score=average
    ).model_dump(mode="json")


def _short(document: str) -> str:
    """The file name of a document, so prompts do not leak mount paths or signed URL queries."""
    return document.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or document
