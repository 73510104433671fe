"""The pictures a user judges a LoRA by (report/): sample grids, the loss curve, report.html and the model card.

The last tests train the real tiny SD 1.5 through `make train-local`'s code, interrupted once and resumed,
and open its report in headless Chromium as a person would.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from contract import history
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from report import RunFacts, render_report
from report.curve import DPI, FIGURE_INCHES, RESUME_COLOUR, ema, render_loss_curve
from report.grid import BACKGROUND, RULE, render_grid

CHROMIUM = Path("/usr/bin/chromium")
COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 200)]


def png(colour, size=(128, 96)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_step(tmp_path: Path, step: int, prompts: list[str], size=(128, 96)) -> history.SampleStep:
    run = tmp_path / "run"
    history.save_samples(run, step, prompts, [png(colour, size) for colour in COLOURS[: len(prompts)]])
    return next(entry for entry in history.read_samples(run / history.SAMPLES_DIR) if entry.step == step)


def non_background(region: Image.Image) -> int:
    pixels = np.asarray(region.convert("RGB")).reshape(-1, 3)
    return int((pixels != np.array(BACKGROUND)).any(axis=1).sum())


# -- grid --------------------------------------------------------------------------------------------------


def test_grid_has_a_labelled_column_per_prompt_over_the_samples(tmp_path):
    prompts = ["sks dog", "a painting of sks dog on a beach at sunset, highly detailed", "sks"]
    grid = Image.open(render_grid(sample_step(tmp_path, 40, prompts), tmp_path / "grid.png"))

    assert grid.width == 3 * 128  # a column per prompt, each as wide as the samples
    band = grid.height - 96  # title and labels above one row of samples
    rows = np.asarray(grid)
    title = next(y for y in range(band) if (rows[y] == RULE).all())  # the rule under the step title, full width
    assert 0 < title < band
    labels = []
    for column, colour in enumerate(COLOURS):
        cell = grid.crop((column * 128, band, (column + 1) * 128, grid.height))
        assert set(cell.getdata()) == {colour}  # the sample itself, unscaled and uncovered
        labels.append(non_background(grid.crop((column * 128 + 1, title + 1, (column + 1) * 128, band))))
    assert all(count > 20 for count in labels)  # each prompt is written above its sample
    assert labels[1] > labels[0] > labels[2]  # the longest prompt inks most, the shortest least
    assert non_background(grid.crop((0, 0, grid.width, title))) > 20  # the step title

    short = Image.open(render_grid(sample_step(tmp_path, 41, ["sks", "sks", "sks"]), tmp_path / "short.png"))
    assert short.height < grid.height  # the long prompt wrapped onto more lines


def test_grid_is_labelled_with_its_step(tmp_path):
    early = np.asarray(Image.open(render_grid(sample_step(tmp_path, 5, ["sks"]), tmp_path / "a.png")))
    late = np.asarray(Image.open(render_grid(sample_step(tmp_path, 500, ["sks"]), tmp_path / "b.png")))
    assert early.shape == late.shape
    rows = np.nonzero((early != late).any(axis=(1, 2)))[0]
    assert rows.size and rows.max() < early.shape[0] - 96  # only the title differs, never the sample


def test_wide_samples_are_scaled_to_the_cell_limit(tmp_path):
    grid = Image.open(render_grid(sample_step(tmp_path, 1, ["a", "b"], size=(1024, 768)), tmp_path / "g.png"))
    assert grid.width == 2 * 512 and grid.height > 384


# -- curve -------------------------------------------------------------------------------------------------


def make_history(run: Path, steps: int = 60, resume_at: int | None = 20) -> Path:
    history.record_start(run, 0, "d1a2b3c4", 12)
    for step in range(1, steps + 1):
        if step == (resume_at or 0) + 5:  # lost 5 steps after the checkpoint, resumed from it
            history.record_start(run, resume_at, "d1a2b3c4", 12)
            for redo in range(resume_at + 1, step):
                history.record_step(run, redo, 0.5 * math.exp(-redo / 30) + 0.1, 1e-4)
        loss = 0.5 * math.exp(-step / 30) + 0.1 + 0.05 * math.sin(step)
        history.record_step(run, step, loss, 1e-4 * min(1, step / 10))
        if step % 20 == 0:
            history.record_checkpoint(run, step)
    return history.history_path(run)


def test_loss_curve_marks_checkpoints_and_resumes(tmp_path):
    read = history.read_history(make_history(tmp_path / "run"))
    assert read.resumes == [20] and read.checkpoints == [20, 40, 60]
    marked = Image.open(render_loss_curve(read, tmp_path / "loss.png")).convert("RGB")
    assert marked.size == (FIGURE_INCHES[0] * DPI, FIGURE_INCHES[1] * DPI)

    read.resumes.clear()
    plain = Image.open(render_loss_curve(read, tmp_path / "plain.png")).convert("RGB")
    resume_colour = np.array([int(RESUME_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])

    def resume_pixels(image):
        return int((np.abs(np.asarray(image).astype(int) - resume_colour).sum(axis=2) < 30).sum())

    assert resume_pixels(marked) > 100 and resume_pixels(plain) == 0


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75])


# -- page --------------------------------------------------------------------------------------------------


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)


SPEC = TrainSpec(
    family="sdxl", base_model="stabilityai/stable-diffusion-xl-base-1.0", dataset={"source": "/d"}, rank=16,
    learningRate=2e-4, resolution=1024, precision="bf16", trainTextEncoder=True, steps=60, triggerWord="sks",
)  # fmt: skip


def synthetic_run(folder: Path, prompts: list[str]) -> Path:
    """A run folder as `make fetch` lays it out: LoRA files and card at the top, history, samples."""
    make_history(folder)
    for step in (20, 40, 60):
        history.save_samples(folder, step, prompts, [png(colour) for colour in COLOURS[: len(prompts)]])
    metadata = {"lorastack.spec": SPEC.to_env_json(), "lorastack.data_hash": "d1a2b3c4"}
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(folder / "pytorch_lora_weights.safetensors"), metadata)
    (folder / "README.md").write_text("---\nbase_model: x\n---\n\n# LoRA for x\n")
    return folder


def test_report_page_states_the_facts_and_shows_every_grid_and_the_curve(tmp_path):
    prompts = ["sks dog", "<script>alert('x')</script> & sks"]
    folder = synthetic_run(tmp_path / "outputs" / "sdxl-4090", prompts)
    facts = RunFacts(stack="sdxl-4090", backend="runpod", gpu="NVIDIA GeForce RTX 4090 x1", cost_usd=0.4123)
    page = render_report(folder, facts)

    assert page == folder / "report.html"
    text = page.read_text()
    parsed = Links()
    parsed.feed(text)
    assert parsed.images == ["loss.png", "grid-step-000060.png", "grid-step-000040.png", "grid-step-000020.png"]
    for name in parsed.images + parsed.links:
        assert "://" not in name and not name.startswith("/") and (folder / name).is_file()
    assert parsed.external == []  # nothing to load from anywhere, no script
    for shown in ("sdxl-4090", "runpod", "NVIDIA GeForce RTX 4090 x1", "$0.41",
                  "stabilityai/stable-diffusion-xl-base-1.0", "d1a2b3c4", "<td>12</td>", "trained, lr 0.0002",
                  "<td>1024 px (aspect buckets)</td>", "bf16", "60 of 60", "20, 40, 60"):
        assert shown in text, shown
    assert "<script>alert" not in text and "&lt;script&gt;alert" in text  # prompts are escaped

    card = (folder / "README.md").read_text()
    assert card.count("![Samples at step 60") == 1 and "(grid-step-000060.png)" in card
    render_report(folder, facts)
    assert (folder / "README.md").read_text() == card  # re-rendering replaces the section, never stacks it


def test_report_of_a_run_without_samples_or_history_says_so(tmp_path):
    page = render_report(tmp_path, RunFacts(stack="empty"))
    text = page.read_text()
    assert "No steps recorded yet" in text and "No samples" in text and "samplePrompts" in text
    assert not (tmp_path / "loss.png").exists()


# -- the real trainer, and the page in a browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`make train-local` on the tiny SD 1.5 with two sample prompts: stopped after step 1, then run to the end."""
    from dataclasses import replace

    import torch

    from contract import families
    from training import local, loop, tiny
    from training.families import sd15

    torch.set_num_threads(2)
    patch = pytest.MonkeyPatch()
    # 2 denoising steps instead of 30: the same pipeline and saving path, at a fifteenth of the CPU time
    quick = replace(families.SD15, sample=replace(families.SD15.sample, steps=2))
    patch.setitem(families.FAMILIES, "sd15", quick)
    patch.setattr(type(sd15.FAMILY), "facts", quick)
    root = tmp_path_factory.mktemp("local-run")
    model = tiny.make_model("sd15", root / "tiny-sd15")
    tiny.make_dataset(root / "data", 4)
    argv = ["--data", str(root / "data"), "--family", "sd15", "--model", str(model), "--steps", "4",
            "--resolution", "256", "--rank", "4", "--out", str(root / "out"), "--trigger-word", "sks",
            "--sample-prompt", "a red circle, sks", "--sample-prompt", "a blue square on a green background, sks",
            "--sample-every", "2"]  # fmt: skip
    args = local.parse_args(argv)
    spec = local.spec_from_args(args)
    paths = RunPaths(args.out.resolve(), f"local-{spec.fingerprint()}")

    stop = threading.Event()

    def first_process_step(step, loss, lr):
        history.record_step(paths.run, step, loss, lr)
        stop.set()  # the machine goes away after step 1 (its checkpoint is complete)

    try:
        assert loop.train(spec, paths, on_step=first_process_step, stop=stop).outcome == "stopped"
        assert local.main(argv) == 0
    finally:
        patch.undo()
    return paths.run


def test_local_training_records_history_and_samples_and_writes_the_report(local_run):
    read = history.read_history(local_run / history.HISTORY_FILE)
    assert [record.step for record in read.steps] == [1, 2, 3, 4]
    assert all(math.isfinite(record.loss) for record in read.steps)
    assert read.checkpoints == [1, 2, 3, 4] and read.resumes == [1]
    assert read.dataset_files == 4 and read.data_hash

    samples = history.read_samples(local_run / history.SAMPLES_DIR)
    assert [entry.step for entry in samples] == [2, 4]
    assert [image.prompt for image in samples[-1].images] == [
        "a red circle, sks",
        "a blue square on a green background, sks",
    ]

    for name in ("report.html", "loss.png", "grid-step-000002.png", "grid-step-000004.png", "lora/samples.png"):
        assert (local_run / name).is_file(), name
    assert Image.open(local_run / "grid-step-000004.png").width == 2 * 256
    assert "![Samples at step 4" in (local_run / "lora" / "README.md").read_text()
    text = (local_run / "report.html").read_text()
    assert "<td>local</td>" in text and "CPU" in text and read.data_hash in text


def test_report_page_renders_in_headless_chromium(local_run, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y chromium` (make setup and .ci/run install it)")
    shot = tmp_path / "report.png"
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1280,2000", (local_run / "report.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    keep = Path(__file__).parent.parent / "build" / "report-screenshot.png"  # for a person to look at
    keep.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, keep)

    screenshot = Image.open(shot).convert("RGB")
    assert screenshot.size == (1280, 2000)
    pixels = np.asarray(screenshot)
    colours = {tuple(colour) for colour in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # text, tables, the curve and the samples: not a blank or error page

    # the newest grid is on the page, unscaled: a row of its samples' pixels appears somewhere in the screenshot
    grid = np.asarray(Image.open(local_run / "grid-step-000004.png").convert("RGB")).astype(int)
    columns = np.arange(0, grid.shape[1], 16)
    probe = grid[-10, columns]  # 32 pixels across both samples, near their bottom
    shown = pixels.astype(int)
    assert any(
        (np.abs(shown[:, offset + columns] - probe).sum(axis=2) <= 6).all(axis=1).any()
        for offset in range(shown.shape[1] - grid.shape[1])
    ), "the grid's pixels are not in the screenshot"
