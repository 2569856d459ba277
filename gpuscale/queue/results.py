"""Result models of the deck task types (pydantic).

Two kinds of model live here:

* *Answer* models — what the language model is asked to produce.  Their JSON schema is sent to
  Ollama as ``format`` (structured output) and the answer is validated with the same model, so a
  reply that does not fit is caught, never stored.
* *Result* models — what a task stores in the queue.  Visual tasks store a document-level result
  (pages in order); text tasks store the answer's fields plus a ``meta`` object (model, template,
  pages used), so consumers read ``result["name"]`` directly.

Each task type names its answer and result model in the catalogue (:mod:`gpuscale.queue.tasktypes`);
they live in the queue package because both the worker (which writes results) and anyone reading
them (the CLI, an API) depend on them.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# ----------------------------------------------------------------------------- answer models


class Answer(BaseModel):
    """Base of the models the LLM fills in: unknown keys are dropped, not an error."""

    model_config = ConfigDict(extra="ignore")


SlideType = Literal[
    "title",
    "problem",
    "solution",
    "product",
    "market",
    "business_model",
    "traction",
    "team",
    "competition",
    "financials",
    "funding_ask",
    "roadmap",
    "contact",
    "other",
]


class SlideDescription(Answer):
    """One slide as the vision model sees it."""

    title: str = Field(description="the slide's headline, or a short made-up one if it has none")
    slide_type: SlideType = Field(description="what the slide is for in a pitch deck")
    description: str = Field(description="what the slide shows and argues, in 2-5 sentences")
    text_content: str = Field(description="the text printed on the slide, as read")
    visual_elements: list[str] = Field(description="charts, photos, diagrams, logos, tables on the slide")
    key_points: list[str] = Field(description="the claims or numbers an investor should notice")


class SlideFeedback(Answer):
    """Feedback on one slide, from its description."""

    score: int = Field(ge=1, le=10, description="1 (weak) to 10 (excellent)")
    strengths: list[str]
    improvements: list[str]
    feedback: str = Field(description="two or three sentences for the founder")


class CompanyOffering(Answer):
    summary: str = Field(description="what the company sells, in one or two sentences")
    products: list[str]
    target_customers: list[str]
    value_proposition: str


class StartupName(Answer):
    name: str | None = Field(description="the startup's name as written in the deck, null if absent")
    confidence: float = Field(ge=0, le=1)
    evidence: str = Field(description="where in the deck the name appears")


HealthcareSector = Literal[
    "digital_health",
    "medtech",
    "biotech",
    "pharma",
    "diagnostics",
    "healthcare_services",
    "not_healthcare",
]


class HealthcareClassification(Answer):
    is_healthcare: bool
    sector: HealthcareSector
    subsectors: list[str]
    confidence: float = Field(ge=0, le=1)
    reasoning: str


FundingRound = Literal[
    "pre_seed", "seed", "series_a", "series_b", "series_c_plus", "bridge", "grant", "unknown"
]


class FundingAmount(Answer):
    amount: float | None = Field(ge=0, description="the amount being raised, in units of currency")
    currency: str | None = Field(description="ISO 4217 code, e.g. EUR or USD")
    round: FundingRound | None
    raw_text: str | None = Field(description="the deck's own words about the raise")


class DeckDate(Answer):
    date: dt.date | None = Field(description="the deck's date (first day of the month/year if vague)")
    precision: Literal["day", "month", "year", "unknown"]
    raw_text: str | None


class TemplateSection(Answer):
    name: str
    score: int = Field(ge=0, le=10)
    analysis: str


class TemplateAnalysis(Answer):
    sections: list[TemplateSection]
    overall_score: float = Field(ge=0, le=10)
    strengths: list[str]
    weaknesses: list[str]
    summary: str


ClinicalStage = Literal[
    "not_applicable", "concept", "preclinical", "phase_1", "phase_2", "phase_3", "approved", "post_market"
]


class ClinicalAnalysis(Answer):
    applicable: bool = Field(description="false if the company does no clinical work")
    clinical_stage: ClinicalStage
    evidence: list[str]
    risks: list[str]
    summary: str


class RegulatoryAnalysis(Answer):
    applicable: bool
    pathways: list[str] = Field(description="e.g. FDA 510(k), De Novo, PMA, CE/MDR class IIa, HIPAA")
    status: str = Field(description="where the company stands on its regulatory path")
    risks: list[str]
    summary: str


EvidenceQuality = Literal["strong", "moderate", "weak", "none"]


class ScienceAnalysis(Answer):
    applicable: bool
    core_technology: str
    scientific_claims: list[str]
    evidence_quality: EvidenceQuality
    risks: list[str]
    summary: str


# ----------------------------------------------------------------------------- stored results


class PageAnalysis(SlideDescription):
    """A described page, as stored: the answer plus where it came from."""

    model_config = ConfigDict(extra="forbid")
    page: int = Field(ge=1)
    image_width: int = Field(ge=1)
    image_height: int = Field(ge=1)


class VisualAnalysisResult(BaseModel):
    """The result of one ``visual_analysis`` page batch."""

    model_config = ConfigDict(extra="forbid")
    document: str
    first_page: int = Field(ge=1)
    last_page: int = Field(ge=0, description="last page actually present (may be < first_page: none)")
    page_count: int = Field(ge=0, description="pages in the whole document")
    dpi: int
    model: str
    pages: list[PageAnalysis]


class SlideFeedbackItem(SlideFeedback):
    model_config = ConfigDict(extra="forbid")
    page: int = Field(ge=1)
    title: str


class SlideFeedbackResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document: str
    model: str
    slides: list[SlideFeedbackItem]
    average_score: float | None


class TextMeta(BaseModel):
    """What a text task's answer was based on."""

    model_config = ConfigDict(extra="forbid")
    model: str
    pages: int = Field(ge=0, description="slides in the deck text the model read")
    truncated: bool = False
    template: str | None = None
    sector: str | None = None


def _stored(answer: type[Answer]) -> type[BaseModel]:
    """The stored form of a text answer model: the same fields plus ``meta``."""

    return type(  # a subclass built at import time, so each type has a named, importable model
        answer.__name__ + "Result",
        (answer,),
        {
            "__annotations__": {"meta": TextMeta},
            "model_config": ConfigDict(extra="forbid"),
            "__module__": __name__,
        },
    )


CompanyOfferingResult = _stored(CompanyOffering)
StartupNameResult = _stored(StartupName)
HealthcareClassificationResult = _stored(HealthcareClassification)
FundingAmountResult = _stored(FundingAmount)
DeckDateResult = _stored(DeckDate)
TemplateAnalysisResult = _stored(TemplateAnalysis)
ClinicalAnalysisResult = _stored(ClinicalAnalysis)
RegulatoryAnalysisResult = _stored(RegulatoryAnalysis)
ScienceAnalysisResult = _stored(ScienceAnalysis)


class NoopResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slept_s: float
    server_id: str
