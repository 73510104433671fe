"""The interface every model family implements: what the trainer's pipeline steps ask of a family.

The pipeline steps (training/models.py, loop.py, latents.py, export.py, tiny.py, bench/) never branch on a
family name; they call these methods. A family is one module in this package (sd15.py, sdxl.py, flux.py)
exposing `FAMILY`, an instance of a `ModelFamily` subclass, plus its torch-free facts in contract/families.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.training_utils import compute_snr
from transformers import PreTrainedModel

from contract.families import FamilyFacts
from contract.spec import TrainSpec

if TYPE_CHECKING:
    from training.models import ModelBundle

# The attention projections diffusers' LoRA training examples adapt in CLIP text encoders
# (train_text_to_image_lora*.py, train_dreambooth_lora_sdxl.py).
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class StepInputs:
    """What a family's loss gets for one micro-batch; the loop has drawn the noise (noise offset applied)."""

    latents: torch.Tensor  # (B, C, h, w), scaled (and shifted) by the family
    text: dict[str, torch.Tensor]  # the text conditioning, as the family's encode_text returns it
    noise: torch.Tensor  # like latents
    time_ids: torch.Tensor  # (B, 6): original size, crop top-left, target size of each image
    generator: torch.Generator  # the run's CPU noise stream: timesteps are drawn from it (exact resume)


class ModelFamily(ABC):
    """One model family: its components and how they load, LoRA targets, text encoding, latents, loss,
    samples, the tiny model tests train, and the names its LoRA files use."""

    facts: ClassVar[FamilyFacts]
    # pipeline component name -> class, as the model folder (model_index.json) holds them. Training adds
    # noise with the scheduler class named here, whatever sampler the model ships with.
    components: ClassVar[dict[str, type[Any]]]  # diffusers/transformers classes: Any to mypy (pyproject)
    pipeline_class: ClassVar[type[DiffusionPipeline]]  # for samples, and the tiny model's folder layout
    sample_scheduler_class: ClassVar[type[Any]]  # the sampler sample images are generated with
    pipeline_extras: ClassVar[dict[str, Any]] = {}  # further pipeline arguments (e.g. no safety checker)
    lora_targets: ClassVar[list[str]]  # module names in the denoiser that get LoRA adapters
    text_encoder_lora_targets: ClassVar[list[str]] = CLIP_LORA_TARGETS  # when trainTextEncoder is on
    lora_loader: ClassVar[type[Any]]  # the diffusers LoraLoaderMixin whose save_lora_weights writes our file
    vae_name: ClassVar[str] = "vae"  # the autoencoder's component name (LDM's pipelines call it vqvae)

    @property
    def text_encoder_names(self) -> list[str]:
        """The components that encode the prompt, in the pipeline's order (text_encoder, text_encoder_2, ...)."""
        return [name for name in self.components if name.startswith("text_encoder")]

    @property
    def tokenizer_names(self) -> list[str]:
        return [name for name in self.components if name.startswith("tokenizer")]

    @property
    def name(self) -> str:
        return self.facts.name

    @property
    def denoiser_name(self) -> str:
        return self.facts.denoiser

    # ------------------------------------------------------------------------------------------- loading

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return weight_dtype

    def read_components(self, spec: TrainSpec, cache_dir: Path | None, weight_dtype: torch.dtype) -> dict[str, Any]:
        """Each component read from `spec.base_model` straight into its dtype (FLUX in fp32 would not even fit
        in a pod's RAM): diffusers models take `torch_dtype`, transformers models `dtype`."""
        common: dict[str, object] = {"revision": spec.revision, "cache_dir": cache_dir}
        components = {}
        for name, component_class in self.components.items():
            options = dict(common)
            if issubclass(component_class, ModelMixin):
                options["torch_dtype"] = self.vae_dtype(weight_dtype) if name == self.vae_name else weight_dtype
            elif issubclass(component_class, PreTrainedModel):
                options["dtype"] = weight_dtype
            components[name] = component_class.from_pretrained(spec.base_model, subfolder=name, **options)
        return components

    def text_encoder_lora_options(self, name: str, encoder: PreTrainedModel) -> dict[str, Any]:
        """Extra LoraConfig arguments for a trained text encoder (e.g. the layers that reach the loss)."""
        return {}

    # ------------------------------------------------------------------------------------------ encoding

    def max_token_length(self, name: str, tokenizer: Any) -> int:
        """The length token ids of `tokenizer` are padded to: what its text encoder was trained with."""
        return tokenizer.model_max_length

    def tokenize(self, tokenizers: dict[str, Any], captions: list[str]) -> dict[str, torch.Tensor]:
        return {
            name: tokenizer(
                captions,
                padding="max_length",
                max_length=self.max_token_length(name, tokenizer),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for name, tokenizer in tokenizers.items()
        }

    @abstractmethod
    def encode_text(
        self, encoders: dict[str, torch.nn.Module], token_ids: dict[str, torch.Tensor], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Token ids -> the denoiser's text conditioning, as the family's pipeline computes it."""

    def latent_shift(self, vae_config: Any) -> float:
        """Subtracted from VAE latents before scaling by `scaling_factor`."""
        return 0.0

    # ---------------------------------------------------------------------------------------------- loss

    @abstractmethod
    def loss(
        self, models: ModelBundle, denoiser: torch.nn.Module, inputs: StepInputs, spec: TrainSpec
    ) -> torch.Tensor:
        """Timesteps, noisy latents, the denoiser's prediction and the loss against the family's target.

        `denoiser` is the module to call (possibly wrapped for data parallelism); `models.denoiser` the bare one.
        """

    # ------------------------------------------------------------------------------------------ sampling

    def sample_pipeline(self, models: ModelBundle) -> DiffusionPipeline:
        """An inference pipeline over the live modules (LoRA applied), for sample images during training."""
        return self.pipeline_class(
            **{self.vae_name: models.vae},
            **models.text_encoders,
            **models.tokenizers,
            **{self.denoiser_name: models.denoiser},
            scheduler=self.sample_scheduler_class.from_config(models.noise_scheduler.config),
            **self.pipeline_extras,
        )

    @abstractmethod
    def tiny_pipeline(self) -> DiffusionPipeline:
        """A tiny random-weight pipeline of this family (same classes and layout as the real model)."""

    # -------------------------------------------------------------------------------------------- export

    def lora_file_usage(self, weight_name: str) -> str:
        """The model card's line for the diffusers-format file when it is the only one (no kohya file): which
        tools load it, and how."""
        return (
            f"`{weight_name}`: the one file for diffusers (`pipeline.load_lora_weights(repo)`), "
            "ComfyUI (`models/loras`, Load LoRA node) and Forge (`models/Lora`)\n"
        )

    def kohya_sd2_base(self, denoiser_config: Any) -> bool:
        """Whether the kohya file is labelled as an SD 2.x LoRA (see training/export.py kohya_metadata)."""
        return False


def ddpm_loss(
    models: ModelBundle,
    denoiser: torch.nn.Module,
    inputs: StepInputs,
    spec: TrainSpec,
    conditioning: dict[str, Any] | None = None,
) -> torch.Tensor:
    """DDPM noise at uniform timesteps; the target is the scheduler's prediction type (epsilon or v), with
    Min-SNR-gamma weighting (Hang et al., 2023) as diffusers' examples apply it. `conditioning`: further
    denoiser arguments (SDXL's added_cond_kwargs)."""
    scheduler, latents, noise = models.noise_scheduler, inputs.latents, inputs.noise
    size = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=inputs.generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"{spec.base_model}: unsupported prediction type {prediction_type!r}")

    prediction = denoiser(noisy, timesteps, inputs.text["prompt_embeds"], return_dict=False, **(conditioning or {}))[0]

    if spec.min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=spec.min_snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
