"""Text pool handlers: the extractions, the classification, template and specialised analyses.

Each reads the deck as text — the merged ``visual_analysis`` descriptions in page order, found
among the task's dependencies (directly or further up the graph) — and asks the language model for
the answer model its task type declares (:mod:`gpuscale.queue.tasktypes`).  ``template_analysis``
picks its template from the ``healthcare_classification`` result; the ``specialized_*`` tasks use
the template that ``template_analysis`` used (falling back to the classification, then to
``general``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gpuscale.queue import tasktypes
from gpuscale.queue.results import TextMeta
from gpuscale.worker.handlers.base import TaskContext, deck_text, find_result, merge_visual_pages
from gpuscale.worker.handlers.templates import TEMPLATES, Template, render_sections, template_for

SYSTEM = (
    "You are an analyst at a venture capital fund specialised in healthcare and deep tech. You "
    "read a startup's pitch deck, given as slide-by-slide descriptions, and answer one precise "
    "question about it. Base every statement on the deck; when the deck does not say, answer null, "
    "'unknown' or an empty list rather than guessing. Answer only with JSON matching the given schema."
)

QUESTIONS: dict[str, str] = {
    "company_offering_extraction": (
        "What does the company offer? Summarise the offering in one or two sentences, list its "
        "products or services, its target customers, and its value proposition."
    ),
    "startup_name_extraction": (
        "What is the startup's name? Give it exactly as written in the deck (usually on the title "
        "or contact slide), your confidence from 0 to 1, and where in the deck you found it."
    ),
    "healthcare_classification": (
        "Is this a healthcare company? Classify its sector (digital_health, medtech, biotech, "
        "pharma, diagnostics, healthcare_services, or not_healthcare), list its subsectors, give "
        "your confidence from 0 to 1 and a short reasoning."
    ),
    "funding_amount_extraction": (
        "How much money is the company raising in this round? Give the amount as a plain number in "
        "units of the currency (2.5M -> 2500000), the ISO 4217 currency code, the round, and the "
        "deck's own words about the raise."
    ),
    "deck_date_extraction": (
        "When was this deck made or presented? Give the date (ISO 8601; use the first day of the "
        "month or year when only those are known), its precision, and the text it comes from. "
        "Dates of past milestones or forecasts are not the deck's date."
    ),
}

TEMPLATE_QUESTION = (
    "Assess the deck with the '{title}' template. For each section below give a score from 0 "
    "(absent) to 10 (excellent) and a short analysis; then an overall score from 0 to 10, the main "
    "strengths and weaknesses, and a summary for the investment committee.\n\nSections:\n{sections}"
)

SPECIALIZED_QUESTIONS: dict[str, str] = {
    "specialized_clinical": (
        "Assess the company's clinical side: does it do clinical work at all (applicable), its "
        "clinical stage, the clinical evidence it presents, the clinical risks, and a summary."
    ),
    "specialized_regulatory": (
        "Assess the company's regulatory position: is regulation relevant (applicable), which "
        "pathways apply (e.g. FDA 510(k), De Novo, PMA, CE under MDR/IVDR, HIPAA), where the "
        "company stands, the regulatory risks, and a summary."
    ),
    "specialized_science": (
        "Assess the science behind the company: is there a scientific core (applicable), the core "
        "technology, its scientific claims, the quality of the evidence, the scientific risks, and "
        "a summary."
    ),
}


def _prompt(question: str, text: str, context: str = "") -> str:
    ctx = f"\n\nWhat the earlier analysis found:\n{context}" if context else ""
    return f"# Pitch deck\n\n{text}{ctx}\n\n# Question\n\n{question}"


def _answer_model(task_type: str) -> type[BaseModel]:
    model = tasktypes.get(task_type).answer_model
    if model is None:
        raise TypeError(f"task type {task_type!r} declares no answer model")
    return model


async def _ask(
    ctx: TaskContext,
    question: str,
    *,
    context: str = "",
    template: Template | None = None,
    sector: str | None = None,
    deps: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    ollama, model = ctx.require_ollama()
    if deps is None:
        deps = await ctx.dependency_results()
    pages = merge_visual_pages(deps)
    text, truncated = deck_text(pages, ctx.settings.max_prompt_chars)
    await ctx.progress(10.0, f"asking {model} ({len(pages)} slides)")
    answer = await ollama.chat_structured(
        model,
        _answer_model(ctx.task_type),
        system=SYSTEM,
        prompt=_prompt(question, text, context),
        options={"num_ctx": ctx.settings.num_ctx},
    )
    await ctx.progress(100.0, "answer validated")
    meta = TextMeta(
        model=model,
        pages=len(pages),
        truncated=truncated,
        template=template.name if template else None,
        sector=sector,
    )
    return {**answer.model_dump(mode="json"), "meta": meta.model_dump(mode="json")}


async def extraction(ctx: TaskContext) -> dict[str, Any]:
    """The five extraction/classification types: one question over the deck text."""
    return await _ask(ctx, QUESTIONS[ctx.task_type])


def _classification(deps: list[dict[str, Any]]) -> tuple[str | None, bool | None]:
    found = find_result(deps, "healthcare_classification")
    if not found:
        return None, None
    sector = found.get("sector")
    is_hc = found.get("is_healthcare")
    return (sector if isinstance(sector, str) else None), (is_hc if isinstance(is_hc, bool) else None)


async def template_analysis(ctx: TaskContext) -> dict[str, Any]:
    """Section-by-section assessment with the template the healthcare classification selects."""
    deps = await ctx.dependency_results()
    sector, is_healthcare = _classification(deps)
    template = template_for(sector, is_healthcare)
    question = TEMPLATE_QUESTION.format(title=template.title, sections=render_sections(template))
    context = f"Sector: {sector or 'unknown'} (healthcare: {is_healthcare})" if sector else ""
    return await _ask(ctx, question, context=context, template=template, sector=sector, deps=deps)


async def specialized(ctx: TaskContext) -> dict[str, Any]:
    """Clinical, regulatory or science analysis, in the light of the template analysis."""
    deps = await ctx.dependency_results()
    sector, is_healthcare = _classification(deps)
    template_result = find_result(deps, "template_analysis")
    template: Template | None = None
    context_lines: list[str] = []
    if template_result:
        meta = template_result.get("meta") or {}
        template = TEMPLATES.get(str(meta.get("template") or ""))
        sector = sector or meta.get("sector")
        if template_result.get("summary"):
            context_lines.append(f"Template analysis summary: {template_result['summary']}")
        weaknesses = template_result.get("weaknesses") or []
        if isinstance(weaknesses, list) and weaknesses:
            context_lines.append("Weaknesses found: " + "; ".join(str(w) for w in weaknesses[:8]))
    if template is None:
        template = template_for(sector, is_healthcare)
    context_lines.insert(0, f"Sector: {sector or 'unknown'}; template: {template.title}")
    return await _ask(
        ctx,
        SPECIALIZED_QUESTIONS[ctx.task_type],
        context="\n".join(context_lines),
        template=template,
        sector=sector,
        deps=deps,
    )
