"""One picture per sample step: a column per prompt, each under its (wrapped) prompt, the step on top.

    +------------------------------------------+
    | step 500                                 |   title band
    | a photo of sks  | sks dog on a beach,    |   label band: each prompt wrapped to its column
    |                 | oil painting           |
    | [image]         | [image]                |   the samples, scaled to at most CELL_MAX px wide
    +------------------------------------------+

Width is columns x cell width exactly (no outer margin), so the page can lay grids out predictably.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from contract.history import SampleStep
from contract.workspace import atomic_write_bytes

CELL_MAX = 512  # wider samples are scaled down: a 4-prompt SDXL grid stays ~2000 px wide
SMALLEST_LABEL_FONT = 14  # at 256 px cells; wider cells get proportionally larger text (shown scaled down)
MAX_LABEL_LINES = 4
PADDING = 8
BACKGROUND = (255, 255, 255)
TEXT = (28, 28, 32)
RULE = (215, 215, 222)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: the same on every machine, no font files


def wrap(text: str, font, width: float, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut; past max_lines ends in an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _line_height(font) -> int:
    top, bottom = font.getbbox("Ayg|")[1::2]
    return int(bottom - top) + 4


def render_grid(sample_step: SampleStep, target: Path, cell_max: int = CELL_MAX) -> Path:
    """Write the grid of one sample step as a PNG at `target`."""
    images = [_load(sample.path) for sample in sample_step.images]
    cell_width = min(max(image.width for image in images), cell_max)
    scaled = [image.resize((cell_width, max(1, round(image.height * cell_width / image.width)))) for image in images]
    cell_height = max(image.height for image in scaled)

    label_size = max(SMALLEST_LABEL_FONT, cell_width // 22)
    title_font, label_font = _font(round(label_size * 1.4)), _font(label_size)
    text_width = cell_width - 2 * PADDING
    labels = [wrap(sample.prompt or "(no prompt)", label_font, text_width) for sample in sample_step.images]
    label_line = _line_height(label_font)
    title_height = _line_height(title_font) + 2 * PADDING
    label_height = max(len(lines) for lines in labels) * label_line + 2 * PADDING

    grid = Image.new("RGB", (cell_width * len(images), title_height + label_height + cell_height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    draw.text((PADDING, PADDING), f"step {sample_step.step}", font=title_font, fill=TEXT)
    for column, (image, lines) in enumerate(zip(scaled, labels, strict=True)):
        left = column * cell_width
        if column:
            draw.line([(left, title_height), (left, title_height + label_height - 1)], fill=RULE)
        for number, line in enumerate(lines):
            draw.text((left + PADDING, title_height + PADDING + number * label_line), line, font=label_font, fill=TEXT)
        grid.paste(image, (left, title_height + label_height))
    draw.line([(0, title_height), (grid.width, title_height)], fill=RULE)

    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(target, buffer.getvalue())
    return target
