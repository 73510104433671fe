"""The benchmark's models: SD 1.5, SDXL and FLUX.1-dev architectures with random weights, built in memory.

Speed and FLOPs depend on the architecture, not on the weights, so nothing is downloaded: the published
configs (bench/configs/<family>.json) or the tiny test models' configs (training.tiny) are instantiated
directly on the device. `in_memory_source()` hands these to the trainer's own `training.models.load_models`
components in place of a checkpoint; freezing, LoRA, dtype casting and gradient checkpointing stay the
trainer's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from training.models import ComponentSource
from contract.spec import TrainSpec
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    UNet2DConditionModel,
)
from training import tiny

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Size = Literal["full", "tiny"]
# The components a model folder of each family holds (what training.models.read_components returns).
COMPONENTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}


@dataclass(frozen=True)
class Architecture:
    """One family's component configs: `{component: config dict}`; tokenizers hold only their padded length."""

    family: str
    size: Size
    configs: dict[str, dict[str, Any]]


def full_size(family: str) -> Architecture:
    raw = json.loads((CONFIG_DIR / f"{family}.json").read_text())
    return Architecture(family, "full", {name: raw[name] for name in COMPONENTS[family]})


def tiny_size(family: str) -> Architecture:
    """The configs of training.tiny's model of this family: the models the trainer's tests train."""
    pipeline = tiny.BUILDERS[family]()
    configs = {}
    for name in COMPONENTS[family]:
        component = getattr(pipeline, name)
        if name.startswith("tokenizer"):
            configs[name] = {"model_max_length": component.model_max_length}
        elif name.startswith("text_encoder"):
            configs[name] = component.config.to_dict()
        else:
            configs[name] = dict(component.config)
    return Architecture(family, "tiny", configs)


def architecture(family: str, size: Size) -> Architecture:
    return full_size(family) if size == "full" else tiny_size(family)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created in `dtype` directly: FLUX in fp32 first would need 48 GB for a moment."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _tokenizer(name: str, family: str, config: dict[str, Any]):
    # Character-level tokenizers with the published padded lengths: token ids do not change the step's
    # cost, the sequence length does (77 CLIP tokens, 512 T5 tokens for FLUX.1-dev).
    tokenizer = tiny.t5_tokenizer() if (family, name) == ("flux", "tokenizer_2") else tiny.clip_tokenizer()
    tokenizer.model_max_length = config["model_max_length"]
    return tokenizer


def _text_encoder(name: str, family: str, config: dict[str, Any]) -> torch.nn.Module:
    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    if family == "sdxl":
        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return T5EncoderModel(T5Config(**config))


def build_components(
    model: Architecture, device: torch.device, weight_dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Random-weight components on `device`, in the classes and dtypes training.models.read_components uses."""
    family, configs = model.family, model.configs
    torch.manual_seed(seed)
    # Built outside the dtype context: a scheduler's noise tables must stay fp32.
    scheduler_class = FlowMatchEulerDiscreteScheduler if family == "flux" else DDPMScheduler
    components: dict[str, Any] = {"scheduler": scheduler_class.from_config(configs["scheduler"])}
    # As read_components: SDXL's VAE stays fp32 (it overflows in fp16), every other component is in weight_dtype.
    vae_dtype = torch.float32 if family == "sdxl" else weight_dtype
    with torch.device(device):
        with _default_dtype(vae_dtype):
            components["vae"] = AutoencoderKL.from_config(configs["vae"])
        with _default_dtype(weight_dtype):
            for name in COMPONENTS[family]:
                if name == "unet":
                    components[name] = UNet2DConditionModel.from_config(configs[name])
                elif name == "transformer":
                    components[name] = FluxTransformer2DModel.from_config(configs[name])
                elif name.startswith("text_encoder"):
                    components[name] = _text_encoder(name, family, configs[name])
                elif name.startswith("tokenizer"):
                    components[name] = _tokenizer(name, family, configs[name])
    return components


def in_memory_source(model: Architecture, device: torch.device) -> ComponentSource:
    """A component source for the trainer's own load_models/build_state: `model` built on `device`, no checkpoint.

    Only the source of the components changes: the rest of load_models (and build_state around it) runs as
    in a training run.
    """

    def build(spec: TrainSpec, cache_dir: Path | None, weight_dtype: torch.dtype) -> dict:
        if spec.family != model.family:
            raise ValueError(f"spec is for {spec.family}, the benchmark built {model.family}")
        return build_components(model, device, weight_dtype, seed=spec.seed)

    return build
