"""A trained lorastack LoRA on its base model (cog.yaml `predict:`): Replicate runs a trained version with
the training's output as `weights`, and this loads it into the base pipeline and generates.

The base model and family are read from the LoRA file's own metadata (`lorastack.base_model`,
`lorastack.family`, written by training/export.py), so the weights alone say what to load them into.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path as LocalPath

import torch
from cog import BaseRunner, Input, Path
from diffusers import DiffusionPipeline
from safetensors import safe_open

from contract.families import facts_for
from training.export import DIFFUSERS_WEIGHT_NAME

ADAPTER = "lorastack"


def lora_folder(weights: LocalPath) -> LocalPath:
    """The folder holding the diffusers-format LoRA: `weights` is the training's tar, a folder or the file."""
    if weights.is_file() and tarfile.is_tarfile(weights):
        folder = LocalPath(tempfile.mkdtemp(prefix="lora-"))
        with tarfile.open(weights) as archive:
            archive.extractall(folder, filter="data")  # "data": no links or paths outside the folder
        weights = folder
    if weights.is_file():
        weights = weights.parent
    if not (weights / DIFFUSERS_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"no {DIFFUSERS_WEIGHT_NAME} in {weights}: not a lorastack LoRA")
    return weights


def lora_metadata(folder: LocalPath) -> dict[str, str]:
    with safe_open(folder / DIFFUSERS_WEIGHT_NAME, framework="pt") as handle:
        metadata = handle.metadata() or {}
    missing = [key for key in ("lorastack.family", "lorastack.base_model") if not metadata.get(key)]
    if missing:
        raise ValueError(f"{folder / DIFFUSERS_WEIGHT_NAME}: no {' or '.join(missing)} metadata: not a lorastack LoRA")
    return metadata


class Predictor(BaseRunner):
    def setup(self, weights: Path | str | None = None) -> None:
        if weights is None:
            raise ValueError("this model runs a trained LoRA: use a version made by a training (it brings `weights`)")
        folder = lora_folder(LocalPath(str(weights)))
        metadata = lora_metadata(folder)
        # steps, guidance and size when a request leaves them out: the family's, as the trainer's samples use
        facts = facts_for(metadata["lorastack.family"], metadata["lorastack.base_model"])
        self.sample_defaults, self.native_resolution = facts.sample, facts.native_resolution
        self.trigger_word = metadata.get("lorastack.trigger_word", "")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.pipeline = DiffusionPipeline.from_pretrained(
            metadata["lorastack.base_model"], revision=metadata.get("lorastack.base_model_revision") or None,
            dtype=dtype,
        ).to(device)
        if hasattr(self.pipeline, "load_lora_weights"):
            self.pipeline.load_lora_weights(str(folder), weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=ADAPTER)
            self.adapters = self.pipeline
        else:  # a pipeline without a LoRA loader (LDM text-to-image): its UNet reads the file, as the model card says
            self.pipeline.unet.load_lora_adapter(
                str(folder), weight_name=DIFFUSERS_WEIGHT_NAME, prefix="unet", adapter_name=ADAPTER
            )
            self.adapters = self.pipeline.unet
        self.pipeline.set_progress_bar_config(disable=True)

    def run(
        self,
        prompt: str = Input(description="What to draw; include the trigger word to get the trained subject"),
        lora_scale: float = Input(default=1.0, ge=0.0, le=2.0, description="How strongly the LoRA applies"),
        width: int = Input(default=None, ge=64, le=2048, description="Default: the base model's native size"),
        height: int = Input(default=None, ge=64, le=2048, description="Default: the base model's native size"),
        num_inference_steps: int = Input(default=None, ge=1, le=100, description="Default: the family's usual"),
        guidance_scale: float = Input(default=None, ge=0.0, le=20.0, description="Default: the family's usual"),
        seed: int = Input(default=0, ge=0),
    ) -> Path:
        self.adapters.set_adapters([ADAPTER], [lora_scale])  # a pipeline's or a model's: (names, weights)
        image = self.pipeline(
            prompt,
            width=width or self.native_resolution,
            height=height or self.native_resolution,
            num_inference_steps=num_inference_steps or self.sample_defaults.steps,
            guidance_scale=self.sample_defaults.guidance if guidance_scale is None else guidance_scale,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        output = LocalPath(tempfile.mkdtemp(prefix="out-")) / "output.png"
        image.save(output)
        return Path(output)
