"""Sample pitch decks for the demo: real multi-page PDFs generated with fpdf2.

Each deck is a 16:9 landscape PDF of a fictional startup: a title slide, then slides with a
heading, a few bullet points and, on most slides, a chart drawn with Pillow, plus a page number.
The content is deterministic (same deck index, same bytes apart from the PDF's creation date),
and varied enough across decks (healthcare and not, different rounds and page counts) that the
text pool's extractions and the template choice differ from deck to deck.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from fpdf import FPDF
from PIL import Image, ImageDraw

# 16:9 slides, 338.7 mm x 190.5 mm (13.33 in x 7.5 in, the usual presentation size).
SLIDE_W_MM = 338.7
SLIDE_H_MM = 190.5


@dataclass(frozen=True)
class Company:
    name: str
    tagline: str
    sector: str
    healthcare: bool
    round: str
    amount: str
    date: str
    pages: int


COMPANIES: tuple[Company, ...] = (
    Company(
        "Cardiolytics",
        "Continuous heart monitoring for decentralised clinical trials",
        "medical devices",
        True,
        "Series A",
        "EUR 6M",
        "March 2026",
        18,
    ),
    Company(
        "Fieldgrid",
        "Predictive maintenance for rural power grids",
        "energy software",
        False,
        "Seed",
        "USD 2.5M",
        "January 2026",
        12,
    ),
    Company(
        "Nephro AI",
        "Early detection of chronic kidney disease from routine blood tests",
        "diagnostics",
        True,
        "Seed",
        "EUR 3M",
        "May 2026",
        20,
    ),
    Company(
        "Loomcraft",
        "Made-to-measure garments produced on demand, zero inventory",
        "fashion manufacturing",
        False,
        "Pre-seed",
        "EUR 800k",
        "February 2026",
        10,
    ),
    Company(
        "Helix Therapeutics",
        "Oral peptide drugs for metabolic disease",
        "biotech",
        True,
        "Series B",
        "USD 40M",
        "April 2026",
        24,
    ),
)

# (heading, bullets) of the slides after the title; {fields} are filled from the Company.
SLIDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "The problem",
        (
            "Today's process in {sector} is slow, manual and expensive.",
            "Customers lose weeks to work that should take hours.",
            "Existing tools were not built for this workflow.",
        ),
    ),
    (
        "Our solution",
        (
            "{name}: {tagline}.",
            "One product from first use to measurable results.",
            "Works with the systems customers already run.",
        ),
    ),
    (
        "Product",
        (
            "Live in production with paying customers.",
            "Self-serve onboarding in under a day.",
            "Security and compliance reviews passed with three enterprise buyers.",
        ),
    ),
    (
        "Market",
        (
            "Serviceable market of EUR 4.2B in Europe alone.",
            "Growing 14% a year as budgets move to outcome-based tools.",
            "Beachhead: mid-sized buyers underserved by incumbents.",
        ),
    ),
    (
        "Business model",
        (
            "Annual subscription per site, priced on volume.",
            "Gross margin 78%, payback under 9 months.",
            "Expansion revenue from add-on modules.",
        ),
    ),
    (
        "Traction",
        (
            "ARR grew from EUR 120k to EUR 910k in the last 12 months.",
            "Net revenue retention 131%.",
            "Pipeline of 40 qualified accounts.",
        ),
    ),
    (
        "Competition",
        (
            "Incumbents sell services, not software.",
            "Point solutions cover one step of the workflow.",
            "Our data advantage compounds with every customer.",
        ),
    ),
    (
        "Team",
        (
            "CEO: 12 years in {sector}, previously founded and sold a startup.",
            "CTO: led a 40-person engineering team at a scale-up.",
            "Advisors from industry and academia.",
        ),
    ),
    (
        "Roadmap",
        (
            "Next 6 months: second product line and two new markets.",
            "Next 18 months: platform APIs and partner channel.",
            "Regulatory and certification work planned and budgeted.",
        ),
    ),
    (
        "Financials",
        (
            "Revenue 2025: EUR 0.6M; 2026 plan: EUR 2.1M.",
            "Burn EUR 180k a month, 14 months of runway.",
            "Break-even planned for Q4 2027.",
        ),
    ),
    (
        "The ask",
        (
            "Raising {amount} ({round}).",
            "Use of funds: 55% product, 30% go-to-market, 15% operations.",
            "Milestones: 3x ARR and the next round in 18 months.",
        ),
    ),
)

HEALTHCARE_SLIDES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Clinical evidence",
        (
            "Prospective study with 1,200 patients across 6 hospitals.",
            "Sensitivity 94%, specificity 91% against the reference standard.",
            "Peer-reviewed publication submitted.",
        ),
    ),
    (
        "Regulatory pathway",
        (
            "CE mark under MDR class IIa expected in 2027.",
            "FDA 510(k) pre-submission meeting held.",
            "ISO 13485 quality system in place.",
        ),
    ),
)


def _chart(seed: int, width: int = 520, height: int = 320) -> bytes:
    """A deterministic bar-and-line chart as PNG bytes (pixels for the vision model to describe)."""
    img = Image.new("RGB", (width, height), (248, 249, 252))
    draw = ImageDraw.Draw(img)
    draw.line([(40, height - 30), (width - 20, height - 30)], fill=(80, 80, 80), width=2)
    draw.line([(40, 20), (40, height - 30)], fill=(80, 80, 80), width=2)
    bars = 5 + seed % 3
    step = (width - 80) // bars
    points = []
    for i in range(bars):
        h = 30 + ((seed * 41 + i * 67) % (height - 90))
        x = 55 + i * step
        draw.rectangle([x, height - 30 - h, x + step // 2, height - 31], fill=(40 + 25 * i, 110, 180))
        points.append((x + step // 4, height - 40 - h))
    draw.line(points, fill=(220, 80, 40), width=3)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def company_for(index: int) -> Company:
    return COMPANIES[index % len(COMPANIES)]


def deck_pdf(company: Company, *, pages: int | None = None) -> bytes:
    """The PDF bytes of one deck of ``pages`` slides (default: the company's own page count)."""
    pages = pages or company.pages
    if pages < 1:
        raise ValueError("a deck needs at least one page")
    fields = {
        "name": company.name,
        "tagline": company.tagline,
        "sector": company.sector,
        "round": company.round,
        "amount": company.amount,
    }
    script = list(SLIDES)
    if company.healthcare:
        script[3:3] = HEALTHCARE_SLIDES
    pdf = FPDF(orientation="L", unit="mm", format=(SLIDE_H_MM, SLIDE_W_MM))
    pdf.set_auto_page_break(False)
    pdf.set_title(f"{company.name} - pitch deck")
    pdf.set_author(company.name)
    for page in range(1, pages + 1):
        pdf.add_page()
        if page == 1:
            pdf.set_fill_color(24, 48, 96)
            pdf.rect(0, 0, SLIDE_W_MM, SLIDE_H_MM, style="F")
            pdf.set_text_color(255, 255, 255)
            pdf.set_font("Helvetica", "B", 44)
            pdf.set_xy(24, 60)
            pdf.cell(0, 20, company.name)
            pdf.set_font("Helvetica", "", 20)
            pdf.set_xy(24, 88)
            pdf.multi_cell(280, 10, company.tagline)
            pdf.set_xy(24, 150)
            pdf.set_font("Helvetica", "", 14)
            pdf.cell(0, 8, f"Investor presentation - {company.date} - {company.round}")
            pdf.set_text_color(0, 0, 0)
            continue
        heading, bullets = script[(page - 2) % len(script)]
        pdf.set_font("Helvetica", "B", 28)
        pdf.set_xy(20, 16)
        pdf.cell(0, 14, heading)
        pdf.set_draw_color(24, 48, 96)
        pdf.set_line_width(0.8)
        pdf.line(20, 33, SLIDE_W_MM - 20, 33)
        with_chart = page % 3 != 0
        pdf.set_font("Helvetica", "", 16)
        y = 44.0
        for bullet in bullets:
            pdf.set_xy(24, y)
            pdf.multi_cell(150 if with_chart else 290, 8, "- " + bullet.format(**fields))
            y = pdf.get_y() + 5
        if with_chart:
            pdf.image(io.BytesIO(_chart(page)), x=185, y=44, w=130)
        pdf.set_font("Helvetica", "", 10)
        pdf.set_xy(SLIDE_W_MM - 50, SLIDE_H_MM - 14)
        pdf.cell(30, 6, f"{company.name}  {page}/{pages}", align="R")
    return bytes(pdf.output())


def slug(company: Company) -> str:
    return company.name.lower().replace(" ", "-")


def write_decks(directory: Path, count: int, *, pages: int | None = None) -> list[Path]:
    """Write ``count`` sample decks into ``directory`` (companies cycle); returns their paths."""
    if count < 0:
        raise ValueError("count must be >= 0")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        company = company_for(i)
        path = directory / f"{i + 1:02d}-{slug(company)}.pdf"
        path.write_bytes(deck_pdf(company, pages=pages))
        paths.append(path)
    return paths
