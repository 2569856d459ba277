"""Analysis templates: which sections a deck is judged on, chosen by its healthcare sector.

``template_analysis`` picks the template from the ``healthcare_classification`` result; the
``specialized_*`` tasks read the template that was used, so their prompts match the deck's sector.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    title: str
    sections: tuple[tuple[str, str], ...]  # (section name, what to judge)


_COMMON = (
    ("Problem", "is the problem real, specific and painful, and for whom"),
    ("Solution", "does the solution address the problem; is it differentiated"),
    ("Market", "size, growth and how the market is sized (top-down vs bottom-up)"),
    ("Business model", "who pays, how much, and unit economics"),
    ("Traction", "revenue, users, pilots, growth rate; evidence over promises"),
    ("Team", "founder-market fit, key hires, gaps"),
    ("Competition", "alternatives and incumbents; defensibility"),
    ("Financials and ask", "use of funds, runway, milestones the round buys"),
)

TEMPLATES: dict[str, Template] = {
    "general": Template("general", "General startup", _COMMON),
    "digital_health": Template(
        "digital_health",
        "Digital health",
        (
            *_COMMON,
            ("Clinical validation", "outcome studies, real-world evidence, clinician adoption"),
            ("Reimbursement", "who pays in the health system; billing codes; payer contracts"),
            ("Data and privacy", "HIPAA/GDPR posture, data access, interoperability (FHIR, HL7)"),
        ),
    ),
    "medtech": Template(
        "medtech",
        "Medical devices and diagnostics",
        (
            *_COMMON,
            ("Regulatory pathway", "FDA 510(k)/De Novo/PMA, CE under MDR/IVDR, device class and timeline"),
            ("Clinical evidence", "trials, sensitivity/specificity, study design and size"),
            ("Manufacturing", "supply chain, quality system (ISO 13485), cost of goods"),
        ),
    ),
    "biotech_pharma": Template(
        "biotech_pharma",
        "Biotech and pharma",
        (
            *_COMMON,
            ("Science", "mechanism of action, platform vs asset, preclinical data quality"),
            ("Clinical plan", "indication, trial phases, endpoints, timelines and costs"),
            ("Intellectual property", "patents, freedom to operate, exclusivity"),
        ),
    ),
    "healthcare_services": Template(
        "healthcare_services",
        "Healthcare services",
        (
            *_COMMON,
            ("Operations", "care delivery model, staffing, scalability across sites"),
            ("Reimbursement", "payer mix, contracts, margins per episode of care"),
        ),
    ),
}

# Healthcare sector (the classification's answer) → template.
SECTOR_TEMPLATE: dict[str, str] = {
    "digital_health": "digital_health",
    "medtech": "medtech",
    "diagnostics": "medtech",
    "biotech": "biotech_pharma",
    "pharma": "biotech_pharma",
    "healthcare_services": "healthcare_services",
    "not_healthcare": "general",
}


def template_for(sector: str | None, is_healthcare: bool | None = None) -> Template:
    """The template for a classification; ``general`` when unknown or not healthcare."""
    if is_healthcare is False:
        return TEMPLATES["general"]
    return TEMPLATES[SECTOR_TEMPLATE.get(sector or "", "general")]


def render_sections(template: Template) -> str:
    return "\n".join(f"- {name}: {what}" for name, what in template.sections)
