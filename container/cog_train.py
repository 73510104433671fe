"""lorastack's trainer as a Replicate trainer (cog.yaml `train:`): a zip of captioned images in, the LoRA out.

Its inputs are those of ostris/flux-dev-lora-trainer that lorastack maps a TrainSpec onto (infra/replicate_backend/
training.py `trainer_input`), plus family and base_model, so a stack can name either trainer. The TrainSpec
built from them is validated like a stack's; the run is `training.loop.train` and `training.export.export_trained`,
as in a pod. The output is `trained_model.tar`: the diffusers-format LoRA (plus the kohya file for SDXL/SD 1.5)
with its model card, what `cog_predict.Predictor.setup(weights=...)` loads.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path as LocalPath

from cog import BaseModel, Input, Path, Secret

from contract.families import FAMILY_NAMES
from contract.spec import RunLimits, parse_spec
from contract.workspace import RunPaths

OUTPUT_NAME = "trained_model.tar"


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(description="A .zip of images, each with a same-named .txt caption"),
    trigger_word: str = Input(default="TOK", description="A word that names the subject; use it in prompts"),
    autocaption: bool = Input(default=False, description="Not supported by this trainer: caption with .txt files"),
    steps: int = Input(default=1000, ge=1, le=200_000),
    lora_rank: int = Input(default=16, ge=1, le=256),
    learning_rate: float = Input(default=4e-4, ge=1e-7, le=1e-2),
    batch_size: int = Input(default=1, ge=1, le=64),
    resolution: str = Input(default="1024", description="Training size; a comma-separated list trains at the largest"),
    family: str = Input(default="flux", choices=list(FAMILY_NAMES)),
    base_model: str = Input(default="black-forest-labs/FLUX.1-dev", description="Hugging Face id or path of the base"),
    seed: int = Input(default=42, ge=0),
    hf_repo_id: str = Input(default=None, description="Push the LoRA to this Hugging Face repository"),
    hf_token: Secret = Input(default=None, description="Hugging Face token: gated base models, and the push"),
    wandb_project: str = Input(default=None, description="Log the run to this Weights & Biases project"),
    wandb_api_key: Secret = Input(default=None),
) -> TrainingOutput:
    if autocaption:
        raise ValueError("autocaption is not supported by the lorastack trainer: put a .txt caption beside each image")
    work = LocalPath(tempfile.mkdtemp(prefix="lorastack-"))
    raw: dict[str, object] = {
        "family": family,
        "baseModel": base_model,
        "dataset": {"source": str(unpack_images(LocalPath(input_images), work / "images"))},
        "triggerWord": trigger_word or None,
        "steps": steps,
        "rank": lora_rank,
        "learningRate": learning_rate,
        "batchSize": batch_size,
        "resolution": max(int(size) for size in resolution.split(",")),
        "checkpointEvery": max(1, steps // 4),
        "seed": seed,
        "hfRepo": hf_repo_id or None,
        "wandbProject": wandb_project or None,
    }
    spec = parse_spec(raw, "training input", prefix="")  # bad inputs fail here, each named
    # the trainer's libraries (huggingface_hub, wandb) read their tokens from the environment
    for variable, secret in (("HF_TOKEN", hf_token), ("WANDB_API_KEY", wandb_api_key)):
        if secret is not None and secret.get_secret_value():
            os.environ[variable] = secret.get_secret_value()
    paths = RunPaths(work, f"cog-{spec.fingerprint()}")

    from training.export import export_trained
    from training.loop import train as train_loop
    from training.tracking import Reporter

    # Replicate bills the training itself, and enforces its own deadline: no limits of ours apply here
    reporter = Reporter(paths, spec, RunLimits(max_hours=168, max_cost_usd=10_000), paths.run_id, spec.steps)
    result = train_loop(spec, paths, on_step=reporter.step, on_samples=reporter.samples)
    files = export_trained(result.state)
    reporter.finish("succeeded", f"trained {result.step} steps", files)
    output = work / OUTPUT_NAME
    with tarfile.open(output, "w") as archive:
        for path in sorted(paths.lora.iterdir()):
            archive.add(path, arcname=path.name)
    return TrainingOutput(weights=Path(output))


def unpack_images(archive: LocalPath, folder: LocalPath) -> LocalPath:
    """Extract the zip's images and captions into `folder`, refusing names that would land outside it."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as images:
        for member in images.infolist():
            target = (folder / member.filename).resolve()
            if not target.is_relative_to(folder.resolve()):
                raise ValueError(f"input_images: {member.filename!r} would be written outside the dataset folder")
            if member.is_dir() or member.filename.startswith("__MACOSX/"):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with images.open(member) as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)
    return folder
