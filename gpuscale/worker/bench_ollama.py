"""``gpuscale bench ollama``: how a model serves concurrent requests, as the pools file needs it.

Sends the pool's real requests (the visual pool's slide description with a page image, or the
text pool's question over a deck's text, with the workers' own system prompts and answer schemas)
to an Ollama server, ``k`` at a time for ``k`` = 1..N, and measures requests per second and
latency at each level.  The ratio of each level's throughput to one request's is the pool's
``batching`` curve; the level past which throughput stops growing is the ``parallel`` worth
setting.  The server must run with ``OLLAMA_NUM_PARALLEL`` >= N, or it serves one request at a
time whatever the client sends (and the curve comes out flat).

Not a test: it prints numbers.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gpuscale.queue.results import CompanyOffering, SlideDescription
from gpuscale.worker.handlers.text import QUESTIONS, SYSTEM, _prompt
from gpuscale.worker.handlers.visual import DESCRIBE_PROMPT, DESCRIBE_SYSTEM
from gpuscale.worker.ollama_client import OllamaClient

# A deck's text as the text pool's prompts see it (merged slide descriptions), long enough that the
# prompt's size is realistic (~30 slides).
_SLIDE = (
    "Slide {n}: {title}. The slide shows a chart of monthly recurring revenue growing from $20k to "
    "$140k over 18 months, a photo of the founding team, and the claim that the product cuts "
    "hospital readmissions by 23% in a 400-patient pilot. Text: 'Clinically validated, FDA 510(k) "
    "submitted Q3, raising $4.5M seed'."
)
_TITLES = ("Problem", "Solution", "Market", "Traction", "Team", "Business model", "Competition", "Ask")


def sample_deck_text(slides: int = 30) -> str:
    return "\n\n".join(_SLIDE.format(n=i + 1, title=_TITLES[i % len(_TITLES)]) for i in range(slides))


def sample_slide_png(width: int = 1280, height: int = 720) -> bytes:
    """A slide-sized image with a title, text lines and a chart-like shape (a vision model's input
    cost depends on the image size, not on whether it is a real deck)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, width, 90), fill=(20, 60, 120))
    draw.text((40, 30), "Traction: $140k MRR, 23% fewer readmissions", fill="white")
    for i in range(8):
        draw.text((40, 130 + 40 * i), f"- Point {i + 1}: pilot with 400 patients, 3 hospitals", fill="black")
    for i in range(12):
        h = 20 + 25 * i
        draw.rectangle((700 + 45 * i, 650 - h, 730 + 45 * i, 650), fill=(60, 140, 80))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Level:
    parallel: int
    requests: int
    seconds: float
    latency_p50_s: float
    latency_max_s: float

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class BenchOllamaResult:
    model: str
    pool: str
    levels: list[Level]

    @property
    def batching(self) -> list[float]:
        base = self.levels[0].per_s if self.levels else 0.0
        return [round(lv.per_s / base, 2) if base > 0 else 1.0 for lv in self.levels]

    @property
    def best_parallel(self) -> int:
        """The smallest level within 15% of the best throughput: more only adds latency.  Smaller
        gains come from overlapping the client's side of a request with the server's (even a
        server that serves one at a time shows them), which a worker gets by holding one more
        task than its model serves at once, not from the model."""
        if not self.levels:
            return 1
        best = max(lv.per_s for lv in self.levels)
        return next(lv.parallel for lv in self.levels if lv.per_s >= 0.85 * best)

    def pools_lines(self) -> list[str]:
        n = self.best_parallel
        curve = ", ".join(f"{v:g}" for v in self.batching[:n])
        return [
            f"  parallel: {n}                # OLLAMA_NUM_PARALLEL (gpuscale bench ollama, {self.model})",
            f"  batching: [{curve}]  # requests/s at 1..{n} at once, relative to one",
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pool": self.pool,
            "levels": [
                {
                    "parallel": lv.parallel,
                    "requests": lv.requests,
                    "requests_per_s": round(lv.per_s, 4),
                    "latency_p50_s": round(lv.latency_p50_s, 3),
                    "latency_max_s": round(lv.latency_max_s, 3),
                }
                for lv in self.levels
            ],
            "batching": self.batching,
            "parallel": self.best_parallel,
        }


def _request(pool: str) -> tuple[type[BaseModel], str, str, list[bytes]]:
    """(answer schema, system, prompt, images) of one real request of the pool."""
    if pool == "visual":
        prompt = DESCRIBE_PROMPT.format(page=4, count=30, document="bench.pdf")
        return SlideDescription, DESCRIBE_SYSTEM, prompt, [sample_slide_png()]
    question = QUESTIONS["company_offering_extraction"]
    return (
        CompanyOffering,
        SYSTEM,
        _prompt(question, sample_deck_text()),
        [],
    )


async def run_bench_ollama(
    host: str,
    model: str,
    *,
    pool: str = "visual",
    max_parallel: int = 4,
    rounds: int = 2,
    num_ctx: int | None = None,
    timeout_s: float = 600.0,
    on_level: Callable[[Level], None] = lambda _lv: None,
) -> BenchOllamaResult:
    """For k = 1..max_parallel: ``rounds × k`` requests, k in flight at a time (after one warm-up
    request that loads the model)."""
    if pool not in ("visual", "text"):
        raise ValueError(f"pool must be visual or text, not {pool!r}")
    if max_parallel < 1 or rounds < 1:
        raise ValueError("max_parallel and rounds must be >= 1")
    schema, system, prompt, images = _request(pool)
    options: dict[str, Any] = {} if num_ctx is None else {"num_ctx": num_ctx}
    levels: list[Level] = []
    async with OllamaClient(host, timeout_s=timeout_s) as client:
        await client.warm(model)

        async def one() -> float:
            started = time.perf_counter()
            await client.chat_structured(
                model, schema, prompt=prompt, system=system, images=images, options=options
            )
            return time.perf_counter() - started

        for k in range(1, max_parallel + 1):
            total = rounds * k
            latencies: list[float] = []
            tickets = iter(range(total))

            async def stream(out: list[float] = latencies, todo: Any = tickets) -> None:
                for _ in todo:  # the streams share one iterator: ``total`` requests in all
                    out.append(await one())

            started = time.perf_counter()
            await asyncio.gather(*(stream() for _ in range(k)))
            level = Level(
                parallel=k,
                requests=total,
                seconds=time.perf_counter() - started,
                latency_p50_s=statistics.median(latencies),
                latency_max_s=max(latencies),
            )
            levels.append(level)
            on_level(level)
    return BenchOllamaResult(model=model, pool=pool, levels=levels)
