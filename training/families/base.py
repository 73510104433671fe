"""The interface every model family implements: what the trainer's pipeline steps ask of a family.

The pipeline steps (training/models.py, loop.py, latents.py, export.py, tiny.py, bench/) never branch on a
family name; they call these methods. A family is one module in this package (sd15.py, sdxl.py, flux.py, sd35.py)
exposing `FAMILY`, an instance of a `ModelFamily` subclass, plus its torch-free facts in contract/families.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr
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
    # conditioning computed from the training images themselves (encode_image_conditioning); empty for most
    image: dict[str, torch.Tensor] = field(default_factory=dict)


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
    # Components (in `components`) that compute the denoiser's conditioning from the training image itself rather
    # than from its caption (Kandinsky 2.2: the prior's CLIP image encoder and its image processor). Frozen, cached
    # with the latents and placed like the VAE.
    image_conditioning_names: ClassVar[tuple[str, ...]] = ()
    # Components only sample images need (Kandinsky 2.2's prior, which embeds the prompt), by pipeline name. The
    # family's read_components reads them when the spec asks for samples; they stay on the CPU between samples.
    sample_components: ClassVar[dict[str, type[Any]]] = {}

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
        return {
            name: self.read_component(name, spec.base_model, name, spec.revision, cache_dir, weight_dtype)
            for name in self.components
        }

    def read_component(
        self,
        name: str,
        location: str,
        subfolder: str,
        revision: str | None,
        cache_dir: Path | None,
        weight_dtype: torch.dtype,
    ) -> Any:
        """The component `name` (of `components` or `sample_components`) from `location`/`subfolder`."""
        component_class = self.components.get(name) or self.sample_components[name]
        options: dict[str, object] = {"revision": revision, "cache_dir": cache_dir}
        if issubclass(component_class, ModelMixin):
            options["torch_dtype"] = self.vae_dtype(weight_dtype) if name == self.vae_name else weight_dtype
        elif issubclass(component_class, PreTrainedModel):
            options["dtype"] = weight_dtype
        return component_class.from_pretrained(location, subfolder=subfolder, **options)

    def validate_components(self, components: dict[str, Any], spec: TrainSpec) -> None:
        """Refuse, with a ValueError saying what to change, components that are not this family's model (e.g. an
        SD 2.x UNet loaded as SD 1.x from a path no family lists), before anything trains."""
        return  # by default a family takes what its component classes loaded

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
        """Subtracted from VAE latents before scaling by `latent_scale`."""
        return 0.0

    def latent_scale(self, vae_config: Any) -> float:
        """What VAE latents are multiplied by: the autoencoder's `scaling_factor`, as the family's pipeline decodes."""
        return vae_config.scaling_factor

    def encode_image_conditioning(
        self, components: dict[str, Any], pixels: torch.Tensor, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) training images in [-1, 1] -> conditioning the denoiser gets from the image itself
        (`image_conditioning_names` are the components); none by default."""
        return {}

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

    def save_tiny_model(self, out: Path) -> None:
        """Write the tiny model as the trainer reads it: the real model's folder layout."""
        self.tiny_pipeline().save_pretrained(out, safe_serialization=True)

    # -------------------------------------------------------------------------------------------- export

    def lora_file_usage(self, weight_name: str) -> str:
        """The model card's line for the diffusers-format file when it is the only one (no kohya file): which
        tools load it, and how."""
        return (
            f"`{weight_name}`: the one file for diffusers (`pipeline.load_lora_weights(repo)`), "
            "ComfyUI (`models/loras`, Load LoRA node) and Forge (`models/Lora`)\n"
        )


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

    # no prompt_embeds: a denoiser conditioned through `conditioning` alone (Kandinsky 2.2's image embedding)
    hidden_states = inputs.text.get("prompt_embeds")
    prediction = denoiser(noisy, timesteps, hidden_states, return_dict=False, **(conditioning or {}))[0]
    # A UNet that also learns the variance (Kandinsky 2.2: 8 output channels) predicts the noise in the first ones
    prediction = prediction[:, : latents.shape[1]]

    if spec.min_snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=spec.min_snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def flow_matching_loss(
    models: ModelBundle,
    inputs: StepInputs,
    spec: TrainSpec,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Rectified flow as diffusers' train_dreambooth_lora_{sd3,flux}.py train it: timesteps drawn by the
    weighting scheme's density, noisy = (1 - sigma) * latents + sigma * noise, the target noise - latents (or,
    with preconditionOutputs, the prediction mapped to clean latents and the latents as target), the squared
    error weighted per sigma and averaged per image, then over the batch.

    `predict(noisy, timesteps)`: the denoiser's output for noisy latents shaped like `inputs.latents`, at the
    scheduler's timesteps (0..num_train_timesteps); each family passes its own conditioning and packing."""
    settings = spec.flow_matching
    scheduler, latents, noise = models.noise_scheduler, inputs.latents, inputs.noise
    size = latents.shape[0]
    density = compute_density_for_timestep_sampling(
        weighting_scheme=settings.weighting_scheme,
        batch_size=size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        generator=inputs.generator,
    )
    steps = scheduler.config.num_train_timesteps
    # u == 1.0 (a sigmoid that rounds to 1, the mode density at u = 0) would index past the schedule
    indices = (density * steps).long().clamp(max=steps - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, dtype=latents.dtype).view(size, *[1] * (latents.ndim - 1))
    noisy = (1.0 - sigmas) * latents + sigmas * noise

    prediction = predict(noisy, timesteps)
    if settings.precondition_outputs:
        prediction, target = prediction * (-sigmas) + noisy, latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=settings.weighting_scheme, sigmas=sigmas)
    squared = weighting.float() * (prediction.float() - target.float()) ** 2
    return squared.reshape(size, -1).mean(dim=1).mean()
