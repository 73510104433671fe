"""The benchmark's models: every family's architecture with random weights, built in memory.

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
from diffusers import ModelMixin
from transformers import BertTokenizer, CLIPTokenizer, PreTrainedModel, T5Tokenizer
from transformers.image_processing_utils import ImageProcessingMixin

from contract.spec import TrainSpec
from training import tiny
from training.families import family_for
from training.models import ComponentSource

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Size = Literal["full", "tiny"]
# Character-level tokenizers with the published padded lengths: token ids do not change the step's cost,
# the sequence length does (77 CLIP or LDMBert tokens, 512 T5 tokens for FLUX.1-dev).
TINY_TOKENIZERS = {CLIPTokenizer: tiny.clip_tokenizer, T5Tokenizer: tiny.t5_tokenizer, BertTokenizer: tiny.bert_tokenizer}


@dataclass(frozen=True)
class Architecture:
    """One family's component configs: `{component: config dict}`; tokenizers hold only their padded length."""

    family: str
    size: Size
    configs: dict[str, dict[str, Any]]


def full_size(family: str) -> Architecture:
    raw = json.loads((CONFIG_DIR / f"{family}.json").read_text())
    return Architecture(family, "full", {name: raw[name] for name in family_for(family).components})


def tiny_size(family: str) -> Architecture:
    """The configs of training.tiny's model of this family: the models the trainer's tests train."""
    pipeline = family_for(family).tiny_pipeline()
    configs = {}
    model_family = family_for(family)
    for name in model_family.components:
        component = getattr(pipeline, name)
        if name in model_family.tokenizer_names:
            configs[name] = {"model_max_length": component.model_max_length}
        elif isinstance(component, PreTrainedModel):
            configs[name] = component.config.to_dict()
        elif isinstance(component, ImageProcessingMixin):
            configs[name] = component.to_dict()
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


def build_components(
    model: Architecture, device: torch.device, weight_dtype: torch.dtype, seed: int = 0
) -> dict[str, Any]:
    """Random-weight components on `device`, in the classes and dtypes training.models.read_components uses."""
    family, configs = family_for(model.family), model.configs
    torch.manual_seed(seed)
    components: dict[str, Any] = {}
    for name, component_class in family.components.items():
        config = configs[name]
        if name in family.tokenizer_names:
            components[name] = TINY_TOKENIZERS[component_class]()
            components[name].model_max_length = config["model_max_length"]
        elif issubclass(component_class, ImageProcessingMixin):  # Kandinsky 2.2's CLIP image processor
            components[name] = component_class.from_dict(config)
        elif not issubclass(component_class, (ModelMixin, PreTrainedModel)):
            # a scheduler, built outside the dtype context: its noise tables must stay fp32
            components[name] = component_class.from_config(config)
    # As read_components: each model in its family's dtype for it (SDXL's VAE stays fp32)
    with torch.device(device):
        for name, component_class in family.components.items():
            dtype = family.vae_dtype(weight_dtype) if name == family.vae_name else weight_dtype
            with _default_dtype(dtype):
                if issubclass(component_class, ModelMixin):
                    components[name] = component_class.from_config(configs[name])
                elif issubclass(component_class, PreTrainedModel):
                    components[name] = component_class(component_class.config_class(**configs[name]))
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
