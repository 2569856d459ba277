"""Real pitch-deck PDFs for tests and the demo, generated with fpdf2.

``make_deck()`` writes a landscape multi-page PDF: each slide has a title, body text and most have
an image (a generated chart-like picture), so rendering and the vision prompts see real content.
``corrupt_pdf()`` is a PDF whose body is damaged; ``not_a_pdf()`` is something else entirely.
Others' tests may import these helpers.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

from fpdf import FPDF
from PIL import Image, ImageDraw

SLIDES: list[tuple[str, str]] = [
    ("{company}", "Pitch deck, {date}. Making clinical trials faster with remote monitoring."),
    (
        "The problem",
        "Eight in ten clinical trials miss their enrolment targets; every month of delay costs $600k.",
    ),
    ("Our solution", "{company} pairs a wearable patch with a trial dashboard for sponsors and sites."),
    ("Product", "FDA 510(k) cleared patch; continuous ECG, SpO2 and activity; dashboard with alerts."),
    ("Market", "Decentralised trials market: $9.6B by 2028, growing 14% a year."),
    ("Business model", "Per-patient-month subscription for sponsors, $180 per patient per month."),
    ("Traction", "3 pharma pilots, 1,200 patients monitored, $450k ARR, 22% month-on-month growth."),
    ("Team", "CEO: former CRO operations lead. CTO: 12 years in medical devices. CMO: cardiologist."),
    ("Competition", "Incumbent CRO tools are manual; wearable vendors lack trial workflows."),
    ("Financials", "Revenue 2025: $1.1M; 2026: $3.8M; break-even in Q4 2027."),
    ("The ask", "Raising {amount} {round} to reach 20 sponsors and CE mark under MDR class IIa."),
    ("Contact", "hello@{domain} - thank you."),
]


def _picture(seed: int, width: int = 480, height: int = 300) -> bytes:
    """A deterministic chart-like picture (bars over a gradient), as PNG bytes."""
    img = Image.new("RGB", (width, height), (240, 244, 250))
    draw = ImageDraw.Draw(img)
    for y in range(height):
        shade = 200 + (y * 50) // height
        draw.line([(0, y), (width, y)], fill=(shade, 230, 255 - (y * 60) // height))
    bars = 5 + seed % 4
    bar_w = width // (bars * 2)
    for i in range(bars):
        h = 40 + ((seed * 37 + i * 53) % (height - 80))
        x = bar_w // 2 + i * 2 * bar_w
        draw.rectangle([x, height - h - 10, x + bar_w, height - 10], fill=(30 + 20 * i, 90, 160))
    draw.ellipse([width - 90, 15, width - 20, 85], outline=(200, 40, 40), width=4)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def make_deck(
    path: Path | str | None = None,
    *,
    pages: int = 12,
    company: str = "Acme Health",
    date: str = "March 2025",
    amount: str = "EUR 2.5M",
    round_name: str = "seed",
    images: bool = True,
) -> bytes:
    """A pitch deck of ``pages`` slides (cycling the script above); written to ``path`` if given."""
    if pages < 1:
        raise ValueError("pages must be >= 1")
    pdf = FPDF(orientation="L", unit="mm", format=(190.5, 338.7))  # 16:9 slides
    pdf.set_auto_page_break(False)
    pdf.set_title(f"{company} pitch deck")
    # A fixed date keeps the bytes identical for identical arguments (tests compare them).
    pdf.set_creation_date(dt.datetime(2025, 3, 1, tzinfo=dt.UTC))
    domain = company.lower().replace(" ", "") + ".example"
    for i in range(pages):
        title, body = SLIDES[i % len(SLIDES)]
        fields = {"company": company, "date": date, "amount": amount, "round": round_name, "domain": domain}
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 30)
        pdf.set_xy(18, 16)
        pdf.cell(0, 14, title.format(**fields))
        pdf.set_font("Helvetica", "", 16)
        pdf.set_xy(18, 40)
        pdf.multi_cell(150 if images else 300, 9, body.format(**fields))
        if images and i % 4 != 3:  # most slides carry a picture
            pdf.image(io.BytesIO(_picture(i)), x=180, y=40, w=140)
        pdf.set_font("Helvetica", "", 10)
        pdf.set_xy(300, 176)
        pdf.cell(30, 6, f"{i + 1} / {pages}")
    data = bytes(pdf.output())
    if path is not None:
        Path(path).write_bytes(data)
    return data


def corrupt_pdf(path: Path | str | None = None) -> bytes:
    """Starts like a PDF but its cross-reference table and objects are garbage."""
    good = make_deck(pages=2, images=False)
    data = good[:40] + bytes((b * 7 + 13) % 256 for b in good[40:400]) + b"\n%%EOF\n"
    if path is not None:
        Path(path).write_bytes(data)
    return data


def not_a_pdf(path: Path | str | None = None) -> bytes:
    """A PNG picture, not a PDF."""
    data = _picture(1)
    if path is not None:
        Path(path).write_bytes(data)
    return data
