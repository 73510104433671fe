"""The trained LoRA, written onto the volume and optionally pushed to the Hugging Face Hub.

- `pytorch_lora_weights.safetensors`: diffusers format, written through the pipeline class's own
  `save_lora_weights` (as diffusers' train_*_lora examples do), with the peft LoraConfig in the metadata so
  `pipeline.load_lora_weights(dir)` restores the training alpha, not alpha = rank.
- `<name>.safetensors` (SD 1.x/2.x, SDXL): kohya / sd-scripts format for ComfyUI, A1111 and Forge, named as
  sd-scripts names the UNet it trains (diffusers block names for SD 1.x/2.x, the original checkpoint's LDM names
  for SDXL; `training.lora_formats`), each module with its real `.alpha`. diffusers' `convert_state_dict_to_kohya`
  is not used: it writes alpha = rank, which changes the LoRA's strength.
- FLUX: the diffusers file only, read by diffusers, ComfyUI and Forge alike; alpha/rank is multiplied into its
  weights because ComfyUI and Forge read no metadata (`training.lora_formats` says why no other way works).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY  # the key diffusers' loader reads the LoraConfig from

from contract.families import KohyaLabels
from contract.spec import TrainSpec
from contract.workspace import RunPaths, atomic_write_bytes
from training import lora_formats
from training.families import family_for
from training.version import __version__

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ENV_HF_TOKEN = "HF_TOKEN"

def kohya_labels(family: str) -> KohyaLabels:
    """The family's kohya names (text encoder prefixes, ss_base_model_version, modelspec architecture)."""
    labels = family_for(family).facts.kohya
    if labels is None:
        raise ValueError(f"no kohya layout for family {family!r}")
    return labels




# ---------------------------------------------------------------------------------------------------------
# LoRA modules of a peft-wrapped model
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    name: str  # module path in the un-wrapped model, e.g. down_blocks.1.attentions.0....attn1.to_q
    down: torch.Tensor  # peft lora_A weight (rank x in)
    up: torch.Tensor  # peft lora_B weight (out x rank)
    alpha: float  # kohya alpha: the strength is alpha / rank


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # as accelerate prepared it
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile keeps the real module here


def checkpoint_name_prefix(encoder: torch.nn.Module) -> str:
    """Recent transformers flatten CLIPTextModel (`encoder.layers...`); its checkpoints, kohya files and older
    diffusers all name those modules `text_model.encoder.layers...`, so files are written with that prefix
    (diffusers strips it again when it loads into a flattened model)."""
    from transformers import CLIPTextModel

    encoder = _unwrap(encoder)
    return "text_model." if isinstance(encoder, CLIPTextModel) and not hasattr(encoder, "text_model") else ""


def adapter_name_of(model: torch.nn.Module) -> str:
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError(f"{type(model).__name__} has no peft LoRA adapter")
    if len(configs) > 1:
        raise ValueError(f"{type(model).__name__} has several adapters ({sorted(configs)}); export needs one")
    return next(iter(configs))


def lora_modules(model: torch.nn.Module) -> list[LoraModule]:
    from peft.tuners.lora import LoraLayer

    model = _unwrap(model)
    adapter = adapter_name_of(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter) or module.lora_bias.get(adapter):
            raise ValueError(f"{name}: DoRA / LoRA bias adapters have no kohya LoRA equivalent")
        rank = module.r[adapter]
        found.append(
            LoraModule(
                name=name.removeprefix("base_model.model."),  # a peft PeftModel wraps its model here
                down=module.lora_A[adapter].weight.detach(),
                up=module.lora_B[adapter].weight.detach(),
                # scaling is alpha/r (alpha/sqrt(r) with rsLoRA); kohya applies alpha/r, so store scaling*r
                alpha=float(module.scaling[adapter]) * rank,
            )
        )
    if not found:
        raise ValueError(f"{type(model).__name__}: adapter {adapter!r} wraps no module")
    return found


# ---------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------


def lorastack_metadata(spec: TrainSpec, data_hash: str, family: str) -> dict[str, str]:
    """What produced these weights; read back by `make fetch` and by anyone holding only the file."""
    return {
        "lorastack.version": __version__,
        "lorastack.family": family,
        "lorastack.base_model": spec.base_model,
        "lorastack.base_model_revision": spec.revision or "",
        "lorastack.rank": str(spec.rank),
        "lorastack.alpha": _number(spec.lora_alpha),
        "lorastack.data_hash": data_hash,
        "lorastack.trigger_word": spec.trigger_word or "",
        "lorastack.spec": spec.to_env_json(),
    }


def kohya_metadata(
    spec: TrainSpec, data_hash: str, family: str, name: str, v_prediction: bool = False
) -> dict[str, str]:
    """The `ss_` keys kohya's sd-scripts write and webui tools (A1111, ComfyUI-Manager, Civitai) read, labelled
    by the family's `KohyaLabels`. `v_prediction`: the base model's scheduler predicts v (SD 2.x 768-v);
    sd-scripts then writes `sd_v2_v` and the 768-v architecture."""
    now = datetime.now(UTC)
    labels = kohya_labels(family)
    architecture = labels.modelspec_architecture
    if v_prediction and labels.modelspec_architecture_v_prediction:
        architecture = labels.modelspec_architecture_v_prediction
    base_model_version = labels.base_model_version
    if v_prediction and labels.marks_v_prediction:  # sd-scripts: the version string ends in _v for v-prediction
        base_model_version += "_v"
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": _number(spec.lora_alpha),
        "ss_base_model_version": base_model_version,
        "ss_sd_model_name": spec.base_model,
        "ss_v2": str(labels.v2),
        "ss_resolution": f"({spec.resolution}, {spec.resolution})",
        "ss_steps": str(spec.steps),
        "ss_max_train_steps": str(spec.steps),
        "ss_learning_rate": str(spec.learning_rate),
        "ss_unet_lr": str(spec.learning_rate),
        "ss_text_encoder_lr": str(spec.text_encoder_learning_rate or spec.learning_rate)
        if spec.train_text_encoder
        else "0",
        "ss_network_train_unet_only": str(not spec.train_text_encoder),
        "ss_lr_scheduler": spec.lr_scheduler,
        "ss_lr_warmup_steps": str(spec.warmup_steps),
        "ss_batch_size_per_device": str(spec.batch_size),
        "ss_gradient_accumulation_steps": str(spec.gradient_accumulation),
        "ss_mixed_precision": spec.precision,
        "ss_max_grad_norm": str(spec.max_grad_norm),
        "ss_min_snr_gamma": str(spec.min_snr_gamma) if spec.min_snr_gamma is not None else "None",
        "ss_noise_offset": str(spec.noise_offset),
        "ss_seed": str(spec.seed),
        "ss_cache_latents": str(spec.cache_latents),
        "ss_enable_bucket": str(spec.aspect_buckets),
        "ss_output_name": name,
        "ss_training_comment": f"lorastack {__version__}, data {data_hash}",
        "ss_training_finished_at": str(now.timestamp()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": labels.modelspec_implementation,
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.title": name,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{spec.resolution}x{spec.resolution}",
        **({"modelspec.trigger_phrase": spec.trigger_word} if spec.trigger_word else {}),
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    return safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata)


def _tensor_data_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash / sshs_legacy_hash as kohya computes them: sd-webui-additional-networks identifies
    a LoRA by the sha256 of the tensor section (header skipped), with only the ss_ metadata present."""
    data = _serialize(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[8 + header_length :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }


# ---------------------------------------------------------------------------------------------------------
# the two files
# ---------------------------------------------------------------------------------------------------------


def kohya_state_dict(
    denoiser: torch.nn.Module, text_encoders: dict[str, torch.nn.Module] | None, family: str
) -> dict[str, torch.Tensor]:
    """`lora_unet_<sd-scripts module name>` / `lora_te*_<name>` with `.lora_down.weight`, `.lora_up.weight` and
    `.alpha`, the UNet named as sd-scripts' UNet of the family names it (`lora_formats.kohya_unet_module_name`)."""
    labels = kohya_labels(family)
    prefixes = labels.text_encoder_prefixes
    unet_module_name = lora_formats.kohya_unet_module_name(labels.unet_block_names, _unwrap(denoiser).config)
    named: list[tuple[str, LoraModule]] = [
        ("lora_unet_" + unet_module_name(module.name), module) for module in lora_modules(denoiser)
    ]
    for component, encoder in (text_encoders or {}).items():
        prefix = prefixes.get(component)
        if prefix is None:
            raise ValueError(f"{family} has no text encoder {component!r}")
        name_prefix = checkpoint_name_prefix(encoder)
        named += [(f"{prefix}_{name_prefix}{module.name}", module) for module in lora_modules(encoder)]

    tensors: dict[str, torch.Tensor] = {}
    for dotted, module in named:
        key = dotted.replace(".", "_")
        if f"{key}.lora_down.weight" in tensors:
            raise ValueError(f"two modules map to the kohya name {key}")
        tensors[f"{key}.lora_down.weight"] = module.down
        tensors[f"{key}.lora_up.weight"] = module.up
        tensors[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return tensors


def _peft_config_dict(model: torch.nn.Module) -> dict:
    model = _unwrap(model)
    configs = cast("dict[str, Any]", model.peft_config)  # set by peft on the model it adapts: name -> LoraConfig
    config = configs[adapter_name_of(model)].to_dict()
    return json.loads(json.dumps(config, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def write_diffusers_file(
    denoiser: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module] | None,
    family: str,
    folder: Path,
    metadata: dict[str, str],
) -> Path:
    from peft.utils import get_peft_model_state_dict

    model_family = family_for(family)
    loader = model_family.lora_loader
    baked = model_family.facts.lora_strength_in_weights  # alpha/rank inside lora_B, the config saying alpha == rank

    def layers(model: torch.nn.Module, name_prefix: str = "") -> dict[str, torch.Tensor]:
        model = _unwrap(model)
        if baked:
            state = lora_formats.strength_baked_layers(lora_modules(model))
        else:
            state = get_peft_model_state_dict(model, adapter_name=adapter_name_of(model))
        # peft's naming (lora_A/lora_B) for every family: diffusers' convert_state_dict_to_diffusers renames only
        # attention projections, and a file mixing lora.down with lora_A keys loads without the renamed ones
        return {f"{name_prefix}{key}": value for key, value in state.items()}

    def adapter_config(model: torch.nn.Module) -> dict:
        config = _peft_config_dict(model)
        return lora_formats.unit_strength_config(config) if baked else config

    denoiser_component = model_family.denoiser_name
    arguments: dict[str, object] = {f"{denoiser_component}_lora_layers": layers(denoiser)}
    adapter_configs = {denoiser_component: adapter_config(denoiser)}
    for component, encoder in (text_encoders or {}).items():
        arguments[f"{component}_lora_layers"] = layers(encoder, checkpoint_name_prefix(encoder))
        adapter_configs[component] = adapter_config(encoder)
    if baked:
        metadata = {**metadata, "lorastack.strength": lora_formats.STRENGTH_NOTE}

    # The LoraConfig per component, keyed `<component>.<field>` exactly as diffusers' own save packs it:
    # the loader rebuilds the config from it, so lora_alpha survives instead of defaulting to the rank.
    packed = {f"{component}.{key}": value for component, config in adapter_configs.items() for key, value in config.items()}
    file_metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True), **metadata}
    target = folder / DIFFUSERS_WEIGHT_NAME

    def save_atomically(weights: dict[str, torch.Tensor], filename: str) -> None:
        atomic_write_bytes(Path(filename), _serialize(weights, file_metadata))

    loader.save_lora_weights(
        save_directory=str(folder), weight_name=target.name, save_function=save_atomically, **arguments
    )
    return target


def write_kohya_file(
    denoiser: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module] | None,
    spec: TrainSpec,
    family: str,
    target: Path,
    metadata: dict[str, str],
    data_hash: str,
    prediction_type: str | None,
) -> Path:
    """`prediction_type`: the base model's noise scheduler's (`epsilon`, `v_prediction`), which sd-scripts'
    metadata reports (`sd_v2_v`)."""
    tensors = kohya_state_dict(denoiser, text_encoders, family)
    v_prediction = prediction_type == "v_prediction"
    file_metadata = {**kohya_metadata(spec, data_hash, family, target.stem, v_prediction=v_prediction), **metadata}
    file_metadata.update(_tensor_data_hashes(tensors, file_metadata))
    atomic_write_bytes(target, _serialize(tensors, file_metadata))
    return target


def lora_file_stem(spec: TrainSpec, paths: RunPaths) -> str:
    """A filename ComfyUI/A1111 list nicely: trigger word (or family) plus run id, filesystem-safe."""
    label = spec.trigger_word or spec.family
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{label}-{paths.run_id}").strip("-.") or "lora"


def model_card(spec: TrainSpec, family: str, files: dict[str, Path]) -> str:
    """The Hub README: what was trained and which file each tool loads (every file at strength 1.0 gives the
    trained strength)."""
    trigger = f"Trigger word: `{spec.trigger_word}`\n\n" if spec.trigger_word else ""
    if "kohya" in files:
        name = files["kohya"].name
        usage = (
            f"- `{DIFFUSERS_WEIGHT_NAME}`: diffusers: `pipeline.load_lora_weights(repo)`\n"
            f"- `{name}`: kohya / sd-scripts format, for ComfyUI (`models/loras`, Load LoRA node), "
            f"A1111 and Forge (`models/Lora`, `<lora:{files['kohya'].stem}:1>`); diffusers loads it too: "
            f'`pipeline.load_lora_weights(repo, weight_name="{name}")`\n'
        )
    else:
        usage = f"- {family_for(family).lora_file_usage(DIFFUSERS_WEIGHT_NAME)}"
    return (
        "---\n"
        f"base_model: {spec.base_model}\n"
        "library_name: diffusers\n"
        f"tags: [lora, text-to-image, {family}, lorastack]\n"
        "---\n\n"
        f"# LoRA for {spec.base_model}\n\n"
        f"Trained with lorastack {__version__}: rank {spec.rank}, alpha {_number(spec.lora_alpha)}, "
        f"{spec.steps} steps at {spec.resolution}px.\n\n"
        f"{trigger}"
        "Which file for which tool (strength 1.0 is the trained strength in each):\n\n"
        f"{usage}"
    )


@dataclass(frozen=True)
class HubPush:
    ok: bool
    message: str
    url: str | None = None


def push_to_hub(folder: Path, repo_id: str, token: str | None, create_api: Callable | None = None) -> HubPush:
    """Upload the LoRA folder to a (private, if new) Hub model repo. Never raises: the weights are already
    safe on the volume, and a failed upload must not turn a finished run into a failed one."""
    if not token:
        return HubPush(False, f"not pushed to {repo_id}: {ENV_HF_TOKEN} is not set")
    try:
        if create_api is None:
            from huggingface_hub import HfApi

            create_api = HfApi
        api = create_api(token=token)
        api.create_repo(repo_id=repo_id, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            commit_message=f"lorastack {__version__}: {folder.parent.name}",
        )
    except Exception as error:  # any failure is reported, none is fatal
        detail = str(error).replace(token, "***")  # never echo the token, even inside an error message
        return HubPush(False, f"push to {repo_id} failed ({type(error).__name__}): {detail[:500]}")
    return HubPush(True, f"pushed to https://huggingface.co/{repo_id}", f"https://huggingface.co/{repo_id}")


def export_lora(
    denoiser: torch.nn.Module,
    text_encoders: dict[str, torch.nn.Module] | None,
    spec: TrainSpec,
    paths: RunPaths,
    data_hash: str,
    family: str,
    *,
    prediction_type: str | None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write the LoRA into `paths.lora` (diffusers file always, kohya file for SD 1.x/2.x and SDXL) and push it to
    the Hub when `spec.hf_repo` is set. Returns {"diffusers": path[, "kohya": path][, "model_card": path]}.

    `prediction_type`: the base model's noise scheduler's (`epsilon`, `v_prediction`; None for flow matching),
    reported in the kohya file's metadata."""
    environ = os.environ if environ is None else environ
    folder = paths.lora
    folder.mkdir(parents=True, exist_ok=True)
    metadata = lorastack_metadata(spec, data_hash, family)
    writes_kohya = family_for(family).facts.kohya is not None
    if not writes_kohya:
        metadata["lorastack.kohya"] = "not written for this family: use the diffusers-format file"

    files: dict[str, Path] = {"diffusers": write_diffusers_file(denoiser, text_encoders, family, folder, metadata)}
    if writes_kohya:
        target = folder / f"{lora_file_stem(spec, paths)}.safetensors"
        files["kohya"] = write_kohya_file(
            denoiser, text_encoders, spec, family, target, metadata, data_hash, prediction_type
        )
    card = folder / "README.md"
    atomic_write_bytes(card, model_card(spec, family, files).encode())
    files["model_card"] = card

    if spec.hf_repo:
        result = push_to_hub(folder, spec.hf_repo, environ.get(ENV_HF_TOKEN))
        print(result.message, file=sys.stdout if result.ok else sys.stderr, flush=True)
    return files


__all__ = [
    "DIFFUSERS_WEIGHT_NAME",
    "HubPush",
    "LoraModule",
    "export_lora",
    "kohya_state_dict",
    "lora_modules",
    "push_to_hub",
]


def export_trained(state, environ: Mapping[str, str] | None = None) -> dict[str, Path]:
    """export_lora for a finished run (a training.state.TrainState): its adapters, data hash and spec."""
    spec, models = state.spec, state.models
    return export_lora(
        models.denoiser,
        models.text_encoders if spec.train_text_encoder else None,
        spec,
        state.paths,
        state.dataset.data_hash,
        spec.family,
        prediction_type=getattr(models.noise_scheduler.config, "prediction_type", None),
        environ=environ,
    )
