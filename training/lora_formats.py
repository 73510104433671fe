"""How the LoRA file formats other tools read name modules and carry the LoRA's strength.

kohya / webui files (`lora_unet_<module path with '.' -> '_'>`, `.lora_down/.lora_up/.alpha`), as kohya's
sd-scripts writes them (`networks/lora.py`: the module path inside the UNet sd-scripts trains on):

- SD 1.x / 2.x: sd-scripts trains its own UNet (`library/original_unet.py`), which keeps diffusers' module names
  (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). ComfyUI and A1111 map those names, and
  diffusers' plain `load_lora_weights` reads them; LDM names (`input_blocks.4.1...`) in an SD 1.x file load in
  diffusers only when the caller passes the UNet config, which users do not.
- SDXL: sd-scripts trains the original sgm UNet (`library/sdxl_original_unet.py`), so its files use the LDM
  names (`input_blocks.4.1...`, a resnet's `in_layers.2`), which every tool maps (diffusers' SDXL loader passes
  the UNet config itself).

FLUX and SD 3.5: one diffusers-format file (`transformer.<module>.lora_A/lora_B.weight`) with alpha/rank
multiplied into `lora_B`, so that every loader applies the trained strength at scale 1.0:
- ComfyUI maps every key of a diffusers FLUX or SD 3 file (`comfy/lora.py` model_lora_keys_unet ->
  `flux_to_diffusers`, `mmdit_to_diffusers`) but never reads safetensors metadata: its scale is
  `<key>.alpha / rank`, or 1.0 when the file has no `.alpha`.
- Forge loads LoRAs through ComfyUI's code (`packages_3rdparty/comfyui_lora_collection`), same key map, same rule.
- diffusers reads the LoraConfig from `lora_adapter_metadata` (written with lora_alpha == r here, so scale 1.0);
  without it (older diffusers) it defaults lora_alpha to r: scale 1.0 again.
`.alpha` tensors instead would reach ComfyUI and Forge, but diffusers refuses a file with both `.alpha` tensors
and `lora_adapter_metadata`, so the file would lose the LoraConfig diffusers rebuilds exactly, and every other
reader of diffusers-format keys would have to know the kohya habit of `<module>.alpha`. Baked weights need no
reader to interpret anything. No sd-scripts-named FLUX file (`lora_unet_double_blocks_*`,
fused qkv) is written: A1111 itself runs no FLUX, and its FLUX-capable forks (Forge and its descendants) load the
diffusers keys above through ComfyUI's map; a fused qkv file would only add a second copy whose `.alpha` every
loader divides by the fused rank (3 x rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from training.export import LoraModule

# ---------------------------------------------------------------------------------------------------------
# kohya UNet module names, per family
# ---------------------------------------------------------------------------------------------------------

def kohya_unet_module_name(naming: str, unet_config) -> Callable[[str], str]:
    """diffusers UNet module path -> the module path sd-scripts' UNet has (before '.' -> '_'), for the family's
    `KohyaLabels.unet_block_names`: "diffusers" (kept as is) or "ldm" (the original checkpoint's names)."""
    if naming == "diffusers":
        return lambda name: name
    if naming != "ldm":
        raise ValueError(f"unknown kohya UNet naming {naming!r} (diffusers or ldm)")
    block_prefixes = unet_block_prefixes(unet_config)
    return lambda name: ldm_unet_module_name(name, block_prefixes)


# Inside a ResnetBlock2D (diffusers) / ResBlock (LDM). Transformer blocks use the same names on both sides.
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop conditioning MLP
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def unet_block_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix, derived from a UNet2DConditionModel config.

    The same walk as diffusers' scripts/convert_diffusers_to_original_{sdxl,stable_diffusion}.py, written for
    any number of down blocks and layers per block: LDM numbers every resnet(+attention) layer and every
    downsampler as its own `input_blocks.N`; up blocks have one layer more, and the upsampler sits in the
    level's last output block after the resnet (index 1) or after resnet and attention (index 2).
    """
    block_count = len(config.down_block_types)
    layers = config.layers_per_block
    layers = [layers] * block_count if isinstance(layers, int) else list(layers)
    prefixes: dict[str, str] = {}

    index = 1  # input_blocks.0 is conv_in
    for block in range(block_count):
        for layer in range(layers[block]):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{index}.0"
            prefixes[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if block < block_count - 1:  # diffusers: every down block but the last downsamples
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    prefixes["mid_block.resnets.0"] = "middle_block.0"
    prefixes["mid_block.attentions.0"] = "middle_block.1"
    prefixes["mid_block.resnets.1"] = "middle_block.2"

    index = 0
    for block, block_type in enumerate(config.up_block_types):
        for layer in range(list(reversed(layers))[block] + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{index}.0"
            prefixes[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{index}.1"
            index += 1
        if block < block_count - 1:
            has_attention = "Attn" in block_type
            prefixes[f"up_blocks.{block}.upsamplers.0"] = f"output_blocks.{index - 1}.{2 if has_attention else 1}"
    return prefixes


def ldm_unet_module_name(diffusers_name: str, block_prefixes: dict[str, str]) -> str:
    """`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`."""
    for source, target in _UNET_TOP_LEVEL.items():
        if diffusers_name == source:
            return target
    parts = diffusers_name.split(".")
    for cut in range(len(parts), 0, -1):  # longest matching block prefix
        prefix = ".".join(parts[:cut])
        if prefix in block_prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{prefix}." and rest:
                if rest[0] not in _RESNET_PARTS:
                    break
                rest = [_RESNET_PARTS[rest[0]], *rest[1:]]
            return ".".join([block_prefixes[prefix], *rest])
    raise ValueError(f"no original-checkpoint name for UNet module {diffusers_name!r}")


# ---------------------------------------------------------------------------------------------------------
# strength carried in the weights (FLUX)
# ---------------------------------------------------------------------------------------------------------

def strength_baked_layers(modules: Iterable[LoraModule]) -> dict[str, torch.Tensor]:
    """peft-named `<module>.lora_A.weight` / `.lora_B.weight` with the module's alpha/rank multiplied into lora_B,
    so the LoRA applied at scale 1.0 (alpha == rank) changes the model exactly as the trained adapter does."""
    layers: dict[str, torch.Tensor] = {}
    for module in modules:
        rank = module.down.shape[0]
        layers[f"{module.name}.lora_A.weight"] = module.down
        layers[f"{module.name}.lora_B.weight"] = module.up * (module.alpha / rank)
    return layers


def unit_strength_config(config: dict) -> dict:
    """A peft LoraConfig dict (`LoraConfig.to_dict()`) for strength-baked weights: alpha == rank everywhere, so
    diffusers applies scale 1.0 (rank_pattern's per-module ranks are copied into alpha_pattern)."""
    return {**config, "lora_alpha": config["r"], "alpha_pattern": dict(config.get("rank_pattern") or {}), "use_rslora": False}


# what the metadata of a strength-baked file says, for anyone reading it by hand
STRENGTH_NOTE = (
    "alpha/rank (lorastack.alpha / lorastack.rank) is multiplied into every lora_B: apply this LoRA at strength 1.0"
)
