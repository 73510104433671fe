"""LoRA export, checked the way users load the files: every file of every family goes through diffusers' plain
`load_lora_weights` on a fresh copy of the base model and must reproduce the trained adapter's outputs; kohya key
names follow kohya sd-scripts' naming rules (transcribed here from `networks/lora.py` and its UNets); the FLUX and
SD 3.5 files are read with ComfyUI's key maps and strength rule (transcribed from `comfy/lora.py` and `comfy/utils.py`).

Tiny random-weight models, rank 4 and alpha 8: a lost alpha (scale 1.0 instead of alpha/rank = 2) shows as a 2x
error in the LoRA's delta."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.loaders import (
    FluxLoraLoaderMixin,
    SD3LoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from contract.families import FAMILIES
from contract.spec import TrainSpec
from contract.workspace import RunPaths
from training import export, lora_formats
from training.families import family_for
from training.families.base import CLIP_LORA_TARGETS as TEXT_ENCODER_LORA_TARGETS
from training.families.flux import FLUX_LORA_TARGETS
from training.families.sd15 import UNET_LORA_TARGETS
from training.families.sd35 import SD3_LORA_TARGETS

RANK, ALPHA = 4, 8
# beyond the trainer's attention targets: a resnet's convolution and time projection, the transformer's proj_in,
# so the resnet naming rules are exercised too
UNET_TARGETS = [*UNET_LORA_TARGETS, "proj_in", "conv1", "time_emb_proj"]
DENOISER_TARGETS = {
    "sd15": UNET_TARGETS, "sd2": UNET_TARGETS, "sdxl": UNET_TARGETS, "flux": FLUX_LORA_TARGETS, "sd35": SD3_LORA_TARGETS,
    "ldm256": UNET_TARGETS,
}
# families whose one diffusers file carries alpha/rank in its weights (no kohya file): ComfyUI reads it as is
BAKED = {name for name, facts in FAMILIES.items() if facts.lora_strength_in_weights}
OUTPUT_TOLERANCE = 1e-5  # max abs difference between the loaded LoRA's outputs and the trained adapter's


# ---------------------------------------------------------------------------------------------------------
# tiny models of each family
# ---------------------------------------------------------------------------------------------------------


def sdxl_unet() -> UNet2DConditionModel:
    # SDXL's shape in miniature: no attention in the first block, transformer depth 1/2, text_time conditioning
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def sd15_unet() -> UNet2DConditionModel:
    # SD 1.5's shape in miniature: attention in every block but the last, one layer per block here.
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def clip(with_projection: bool = False, hidden_size: int = 32, hidden_act: str = "quick_gelu") -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, hidden_act=hidden_act,
        vocab_size=1000, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def sd2_components() -> dict[str, torch.nn.Module]:
    # the sd2 family's tiny UNet (SD 2.x's shape: linear projections, heads per block) and OpenCLIP's gelu
    family = family_for("sd2")
    return {"unet": family.tiny_unet(), "text_encoder": clip(hidden_size=family.unet_text_widths[-1], hidden_act="gelu")}


FLUX_HIDDEN = 32  # attention heads x head dim


def flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip


SD3_LAYERS, SD3_HIDDEN = 2, 32  # ComfyUI's SD 3 map assumes 64 x depth for the width; every SD 3 checkpoint has it


def sd3_transformer() -> SD3Transformer2DModel:
    # SD 3.5 medium's shape in miniature: a dual-attention first block, qk RMS norm, a context-pre-only last block
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=SD3_LAYERS, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=SD3_HIDDEN, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip


def base_components(family: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    if family == "sd15":
        components = {"unet": sd15_unet(), "text_encoder": clip()}
    elif family == "sd2":
        components = sd2_components()
    elif family == "sdxl":
        components = {"unet": sdxl_unet(), "text_encoder": clip(), "text_encoder_2": clip(True)}
    elif family == "sd35":
        components = {"transformer": sd3_transformer()}
    elif family == "ldm256":  # LDM's UNet has SD's layout
        components = {"unet": sd15_unet()}
    else:
        components = {"transformer": flux_transformer()}
    return {name: model.eval() for name, model in components.items()}


def add_trained_lora(model: torch.nn.Module, targets: list[str], seed: int) -> torch.nn.Module:
    """A LoRA as if trained: peft initialises lora_B to zero, so give it random values."""
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def make_spec(family: str, **overrides) -> TrainSpec:
    return TrainSpec(
        family=family, base_model=f"tiny/{family}", dataset={"source": "/data"}, resolution=512,
        steps=10, rank=RANK, alpha=ALPHA, trigger_word="sks", **overrides,
    )  # fmt: skip


# Just enough of a pipeline for diffusers' load_lora_weights (no tokenizers, VAE or scheduler): the mixin is the
# pipeline's own loader, called with no extra arguments, as a user calls it.
class _Shell:
    hf_device_map = None

    def __init__(self, components: dict[str, torch.nn.Module]):
        self._components = components
        for name, model in components.items():
            setattr(self, name, model)

    @property
    def components(self):
        return self._components


class TinySD(_Shell, StableDiffusionLoraLoaderMixin):
    pass


class TinySDXL(_Shell, StableDiffusionXLLoraLoaderMixin):
    pass


class TinyFlux(_Shell, FluxLoraLoaderMixin):
    text_encoder = None


class TinySD3(_Shell, SD3LoraLoaderMixin):
    text_encoder = text_encoder_2 = None


SHELLS = {"sd15": TinySD, "sd2": TinySD, "sdxl": TinySDXL, "flux": TinyFlux, "sd35": TinySD3}


def load_as_a_user(family: str, components: dict[str, torch.nn.Module], path) -> dict[str, torch.nn.Module]:
    """The file loaded the way the README and the model card say, into `components`."""
    if family == "ldm256":  # LDMTextToImagePipeline has no LoRA loader: its UNet's own
        components["unet"].load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet")
        return components
    pipeline = SHELLS[family](components)
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    return pipeline.components


def outputs(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Each component's output on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    result = {}
    with torch.no_grad():
        for name, model in components.items():
            if name == "unet":
                added = None
                if model.config.addition_embed_type == "text_time":
                    added = {"text_embeds": torch.randn(1, 32, generator=generator),
                             "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
                sample = torch.randn(1, 4, 16, 16, generator=generator)
                context = torch.randn(1, 5, model.config.cross_attention_dim, generator=generator)
                result[name] = model(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample
            elif isinstance(model, SD3Transformer2DModel):
                result[name] = model(
                    hidden_states=torch.randn(1, 16, 16, 16, generator=generator),
                    encoder_hidden_states=torch.randn(1, 5, 48, generator=generator),
                    pooled_projections=torch.randn(1, 64, generator=generator),
                    timestep=torch.tensor([500.0]),
                ).sample
            elif name == "transformer":
                result[name] = model(
                    hidden_states=torch.randn(1, 16, 4, generator=generator),
                    encoder_hidden_states=torch.randn(1, 3, 32, generator=generator),
                    pooled_projections=torch.randn(1, 32, generator=generator),
                    timestep=torch.tensor([0.5]),
                    img_ids=torch.zeros(16, 3),
                    txt_ids=torch.zeros(3, 3),
                ).sample
            else:
                result[name] = model(torch.tensor([[0, 5, 17, 99, 2]])).last_hidden_state
    return result


# ---------------------------------------------------------------------------------------------------------
# every family's export, as a user gets it
# ---------------------------------------------------------------------------------------------------------

# families without a kohya file: the diffusers file serves every tool (FLUX, SD 3.5), or no kohya tool runs the model
NO_KOHYA = {name for name, facts in FAMILIES.items() if facts.kohya is None}
CASES = {
    "sd15": ("sd15", False), "sd15-te": ("sd15", True), "sd2": ("sd2", False), "sd2-te": ("sd2", True),
    "sdxl": ("sdxl", False), "sdxl-te": ("sdxl", True), "flux": ("flux", False), "sd35": ("sd35", False),
    "ldm256": ("ldm256", False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    family, train_text_encoder = CASES[request.param]
    base = base_components(family)
    trained = {name: copy.deepcopy(model) for name, model in base.items()}
    denoiser_name = FAMILIES[family].denoiser
    add_trained_lora(trained[denoiser_name], DENOISER_TARGETS[family], seed=1)
    encoders = None
    if train_text_encoder:
        encoders = {name: trained[name] for name in trained if name.startswith("text_encoder")}
        for seed, encoder in enumerate(encoders.values(), start=2):
            add_trained_lora(encoder, TEXT_ENCODER_LORA_TARGETS, seed=seed)
    paths = RunPaths(tmp_path_factory.mktemp("volume"), f"run-{request.param}")
    spec = make_spec(family, train_text_encoder=train_text_encoder)
    prediction_type = None if family in BAKED else "epsilon"
    files = export.export_lora(
        trained[denoiser_name], encoders, spec, paths, "datahash123", family, prediction_type=prediction_type, environ={}
    )
    return SimpleNamespace(
        case=request.param, family=family, base=base, trained=trained, encoders=encoders or {}, files=files,
        paths=paths, spec=spec, denoiser=denoiser_name,
    )  # fmt: skip


def lora_files(exported) -> dict[str, object]:
    return {kind: path for kind, path in exported.files.items() if kind in ("diffusers", "kohya")}


def read_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_every_file_loads_in_plain_diffusers_and_reproduces_the_trained_outputs(exported):
    expected = outputs(exported.trained)
    untrained = outputs(exported.base)
    for name in [exported.denoiser, *exported.encoders]:  # the LoRA of every trained component matters
        assert (expected[name] - untrained[name]).abs().max() > 100 * OUTPUT_TOLERANCE, name

    assert set(lora_files(exported)) == ({"diffusers"} if exported.family in NO_KOHYA else {"diffusers", "kohya"})
    for kind, path in lora_files(exported).items():
        base = {name: copy.deepcopy(model) for name, model in exported.base.items()}
        loaded = outputs(load_as_a_user(exported.family, base, path))
        for name, output in expected.items():
            difference = (loaded[name] - output).abs().max().item()
            assert difference < OUTPUT_TOLERANCE, f"{kind} file, {name}: max abs difference {difference:.2e}"


# ---------------------------------------------------------------------------------------------------------
# kohya sd-scripts' naming rules (networks/lora.py LoRANetwork.create_modules), transcribed
# ---------------------------------------------------------------------------------------------------------

# sd-scripts wraps every Linear / Conv2d inside modules of these classes and names it
# prefix + "." + module path + "." + child path, with every "." replaced by "_"
SD_SCRIPTS_UNET_TARGETS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")  # + conv_dim
SD_SCRIPTS_TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
SD_SCRIPTS_TEXT_PREFIXES = {
    "sd15": {"text_encoder": "lora_te"},
    "sd2": {"text_encoder": "lora_te"},
    "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def reference_sdxl_prefixes(config) -> dict[str, str]:
    """diffusers block -> sgm block, the table of diffusers' scripts/convert_diffusers_to_original_sdxl.py
    transcribed with its 3 (= layers per block + 1) and its level count taken from the config."""
    layers, levels = config.layers_per_block, len(config.down_block_types)
    table = {}
    for i in range(levels):
        for j in range(layers):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.0"
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(layers + 1) * i + j + 1}.1"
        for j in range(layers + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(layers + 1) * i + j}.0"
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(layers + 1) * i + j}.1"
        if i < levels - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(layers + 1) * (i + 1)}.0.op"
            # after the resnet, or after resnet and attention where the up block has attention
            place = 2 if "Attn" in config.up_block_types[i] else 1
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{(layers + 1) * i + layers}.{place}"
    table["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        table[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return table


# the script's resnet table: sgm ResBlock part -> diffusers ResnetBlock2D part
REFERENCE_RESNET_PARTS = {
    "conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}


def sd_scripts_unet_path(family: str, path: str, config) -> str:
    """The module path in the UNet sd-scripts trains: its SD 1.x/2.x UNet (library/original_unet.py) has
    diffusers' module names; its SDXL UNet (library/sdxl_original_unet.py) is the sgm checkpoint's."""
    if family in ("sd15", "sd2"):
        return path
    table = reference_sdxl_prefixes(config)
    block = max((prefix for prefix in table if f"{path}.".startswith(f"{prefix}.")), key=len)
    rest = path[len(block) + 1 :]
    if ".resnets." in f".{block}.":
        part, _, tail = rest.partition(".")
        rest = ".".join(filter(None, [REFERENCE_RESNET_PARTS[part], tail]))
    return ".".join(filter(None, [table[block], rest]))


def sd_scripts_names(family: str, base: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """kohya module name -> the base-model module sd-scripts' LoRANetwork would wrap under that name."""
    names: dict[str, torch.nn.Module] = {}

    def walk(root: torch.nn.Module, prefix: str, classes: tuple[str, ...], path_of) -> None:
        for name, module in root.named_modules():
            if type(module).__name__ in classes:
                for child_name, child in module.named_modules():
                    if type(child).__name__ in ("Linear", "Conv2d"):
                        names[f"{prefix}.{path_of(f'{name}.{child_name}')}".replace(".", "_")] = child

    unet = base["unet"]
    walk(unet, "lora_unet", SD_SCRIPTS_UNET_TARGETS, lambda path: sd_scripts_unet_path(family, path, unet.config))
    for component, prefix in SD_SCRIPTS_TEXT_PREFIXES[family].items():
        encoder = base[component]
        # sd-scripts' transformers CLIPTextModel nests its transformer under `text_model`; transformers 5 flattens it
        nesting = "" if hasattr(encoder, "text_model") else "text_model."
        walk(encoder, prefix, SD_SCRIPTS_TEXT_TARGETS, lambda path, nesting=nesting: nesting + path)
    return names


def test_kohya_keys_follow_sd_scripts_naming(exported):
    if exported.family in NO_KOHYA:
        assert "kohya" not in exported.files
        return
    tensors, _ = read_file(exported.files["kohya"])
    allowed = sd_scripts_names(exported.family, exported.base)
    modules = {key.split(".", 1)[0] for key in tensors}
    unknown = sorted(modules - set(allowed))
    assert not unknown, f"not a name sd-scripts gives a {exported.family} module: {unknown[:5]}"

    wrapped = sum(isinstance(m, LoraLayer) for model in exported.trained.values() for m in model.modules())
    assert len(modules) == wrapped  # every trained module, once
    for name in modules:
        assert {key.split(".", 1)[1] for key in tensors if key.split(".", 1)[0] == name} == {
            "lora_down.weight", "lora_up.weight", "alpha"
        }  # fmt: skip
        target = allowed[name]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        in_size = target.in_features if isinstance(target, torch.nn.Linear) else target.in_channels
        out_size = target.out_features if isinstance(target, torch.nn.Linear) else target.out_channels
        assert (down.shape[:2], up.shape[:2]) == ((RANK, in_size), (out_size, RANK)), name
        assert tensors[f"{name}.alpha"].item() == ALPHA
    if exported.family in ("sd15", "sd2"):  # diffusers' block names, as sd-scripts writes SD 1.x and 2.x
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
        assert "lora_unet_down_blocks_1_resnets_0_time_emb_proj" in modules
        assert not [name for name in modules if "input_blocks" in name or "output_blocks" in name]
    else:  # SDXL keeps the sgm names
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
        assert "lora_unet_input_blocks_5_0_emb_layers_1" in modules
        assert not [name for name in modules if "down_blocks" in name or "up_blocks" in name]


# ---------------------------------------------------------------------------------------------------------
# ComfyUI (and Forge, which vendors its loader) reading the FLUX and SD 3.5 files
# ---------------------------------------------------------------------------------------------------------


def comfyui_flux_key_map(double_blocks: int, single_blocks: int, hidden: int) -> dict[str, tuple[str, tuple | None]]:
    """LoRA key -> (BFL weight, (dim, start, length) slice or None): comfy/utils.py `flux_to_diffusers` as
    comfy/lora.py `model_lora_keys_unet` uses it for a Flux model ("transformer." + diffusers weight name)."""
    key_map: dict[str, tuple[str, tuple | None]] = {}
    for i in range(double_blocks):
        block, bfl = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        for index, projection in enumerate("qkv"):
            key_map[f"{block}.attn.to_{projection}"] = (f"{bfl}.img_attn.qkv.weight", (0, index * hidden, hidden))
            key_map[f"{block}.attn.add_{projection}_proj"] = (f"{bfl}.txt_attn.qkv.weight", (0, index * hidden, hidden))
        for diffusers_name, bfl_name in {
            "attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
            "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        }.items():  # fmt: skip
            key_map[f"{block}.{diffusers_name}"] = (f"{bfl}.{bfl_name}.weight", None)
    for i in range(single_blocks):
        block, bfl = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        for index, projection in enumerate("qkv"):
            key_map[f"{block}.attn.to_{projection}"] = (f"{bfl}.linear1.weight", (0, index * hidden, hidden))
        key_map[f"{block}.proj_mlp"] = (f"{bfl}.linear1.weight", (0, hidden * 3, hidden * 4))
        key_map[f"{block}.norm.linear"] = (f"{bfl}.modulation.lin.weight", None)
        key_map[f"{block}.proj_out"] = (f"{bfl}.linear2.weight", None)
    for diffusers_name, bfl_name in {
        "proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }.items():  # fmt: skip
        key_map[diffusers_name] = (f"diffusion_model.{bfl_name}.weight", None)
    return {f"transformer.{name}": target for name, target in key_map.items()}


# comfy/weight_adapter/lora.py LoRAAdapter.load: (up, down) key suffixes it recognises, in its order
COMFYUI_LORA_FORMS = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
]


def comfyui_patches(lora: dict[str, torch.Tensor], key_map) -> tuple[dict[tuple, torch.Tensor], list[str]]:
    """comfy/lora.py `load_lora` and LoRAAdapter.calculate_weight at strength 1.0: the delta added to each
    (weight, slice), its scale `<key>.alpha` / rank or 1.0 without an alpha, and the keys it leaves unloaded."""
    deltas: dict[tuple, torch.Tensor] = {}
    loaded: set[str] = set()
    for key, (weight, offset) in key_map.items():
        alpha = None
        if f"{key}.alpha" in lora:
            alpha = lora[f"{key}.alpha"].item()
            loaded.add(f"{key}.alpha")
        for up_suffix, down_suffix in COMFYUI_LORA_FORMS:
            if key + up_suffix in lora:
                up, down = lora[key + up_suffix], lora[key + down_suffix]
                loaded.update({key + up_suffix, key + down_suffix})
                scale = alpha / down.shape[0] if alpha is not None else 1.0
                deltas[(weight, offset)] = scale * (up.flatten(start_dim=1) @ down.flatten(start_dim=1))
                break
    return deltas, sorted(set(lora) - loaded)


def comfyui_sd3_key_map(depth: int, hidden: int) -> dict[str, tuple[str, tuple | None]]:
    """LoRA key -> (MMDiT weight, slice): comfy/utils.py `mmdit_to_diffusers` as comfy/lora.py `model_lora_keys_unet`
    uses it for an SD3 model ("transformer." + diffusers weight name), its joint blocks (the top-level layers hold
    none of the trainer's targets). ComfyUI takes the width as 64 x depth, which every SD 3 checkpoint has
    (medium 24 x 64, large 38 x 64); the tiny model's is passed here. No `attn2` entry: ComfyUI maps medium's second
    attention from no diffusers name, and the trainer's targets leave it alone (test_family_sd35.py)."""
    key_map: dict[str, tuple[str, tuple | None]] = {}
    for i in range(depth):
        block, mmdit = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for index, projection in enumerate("qkv"):
            key_map[f"{block}.attn.to_{projection}"] = (f"{mmdit}.x_block.attn.qkv.weight", (0, index * hidden, hidden))
            key_map[f"{block}.attn.add_{projection}_proj"] = (
                f"{mmdit}.context_block.attn.qkv.weight", (0, index * hidden, hidden)
            )
        for diffusers_name, mmdit_name in {
            "norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
            "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
            "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
            "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        }.items():  # fmt: skip
            key_map[f"{block}.{diffusers_name}"] = (f"{mmdit}.{mmdit_name}.weight", None)
    return {f"transformer.{name}": target for name, target in key_map.items()}


COMFYUI_KEY_MAPS = {
    "flux": lambda: comfyui_flux_key_map(1, 1, FLUX_HIDDEN),
    "sd35": lambda: comfyui_sd3_key_map(SD3_LAYERS, SD3_HIDDEN),
}


@pytest.mark.parametrize("family", sorted(COMFYUI_KEY_MAPS))
def test_comfyui_reads_the_diffusers_file_at_the_trained_strength(tmp_path, family):
    assert set(COMFYUI_KEY_MAPS) == BAKED  # every family without a kohya file is read by ComfyUI from this one
    base = base_components(family)["transformer"]
    transformer = add_trained_lora(copy.deepcopy(base), DENOISER_TARGETS[family], seed=6)
    files = export.export_lora(
        transformer, None, make_spec(family), RunPaths(tmp_path, f"run-{family}"), "h", family, prediction_type=None,
        environ={},
    )  # fmt: skip
    lora, _ = read_file(files["diffusers"])
    key_map = COMFYUI_KEY_MAPS[family]()
    deltas, not_loaded = comfyui_patches(lora, key_map)
    assert not not_loaded, f"ComfyUI leaves keys unloaded: {not_loaded[:5]}"

    trained = {}  # the adapter's own delta (scale alpha/rank = 2 included), placed where ComfyUI patches
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            assert module.scaling["default"] == ALPHA / RANK
            trained[key_map[f"transformer.{name}"]] = module.get_delta_weight("default")
    assert deltas.keys() == trained.keys()
    for target, delta in trained.items():
        torch.testing.assert_close(deltas[target], delta, atol=1e-6, rtol=1e-5,
                                   msg=lambda text, target=target: f"{target}: {text}")


# ---------------------------------------------------------------------------------------------------------
# metadata and model card
# ---------------------------------------------------------------------------------------------------------


def test_metadata_in_every_file(exported):
    for kind, path in lora_files(exported).items():
        _, metadata = read_file(path)
        assert metadata["lorastack.data_hash"] == "datahash123", kind
        assert metadata["lorastack.family"] == exported.family
        assert metadata["lorastack.alpha"] == "8" and metadata["lorastack.rank"] == "4"
        assert TrainSpec.model_validate_json(metadata["lorastack.spec"]) == exported.spec
        assert metadata["lorastack.version"] == export.__version__
    assert not [p for p in exported.paths.lora.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp left over

    tensors, metadata = read_file(exported.files["diffusers"])
    adapter = json.loads(metadata[export.LORA_ADAPTER_METADATA_KEY])
    assert adapter[f"{exported.denoiser}.r"] == RANK
    if exported.family in BAKED:  # alpha/rank is inside the weights: every loader applies scale 1.0
        assert adapter["transformer.lora_alpha"] == RANK
        assert metadata["lorastack.strength"] == lora_formats.STRENGTH_NOTE
        assert not [key for key in tensors if key.endswith(".alpha")]
        assert "not written" in metadata["lorastack.kohya"]
        return
    assert adapter[f"{exported.denoiser}.lora_alpha"] == ALPHA
    if exported.family == "ldm256":
        assert "not written" in metadata["lorastack.kohya"] and not [key for key in tensors if key.endswith(".alpha")]
        return
    _, kohya = read_file(exported.files["kohya"])
    assert kohya["ss_network_module"] == "networks.lora"
    assert (kohya["ss_network_dim"], kohya["ss_network_alpha"]) == ("4", "8")
    assert kohya["ss_resolution"] == "(512, 512)" and kohya["ss_steps"] == "10"
    assert kohya["ss_network_train_unet_only"] == str(not exported.encoders)
    assert len(kohya["sshs_model_hash"]) == 64
    assert kohya["modelspec.prediction_type"] == "epsilon"
    if exported.family == "sdxl":
        assert kohya["ss_base_model_version"] == "sdxl_base_v1-0"
        assert kohya["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    elif exported.family == "sd2":  # an epsilon (2-base) model: the 768-v labels need a v-prediction scheduler
        assert (kohya["ss_base_model_version"], kohya["ss_v2"]) == ("sd_v2", "True")
        assert kohya["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
        assert kohya["modelspec.implementation"] == "diffusers"
    else:
        assert (kohya["ss_base_model_version"], kohya["ss_v2"]) == ("sd_v1", "False")
        assert kohya["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert kohya["modelspec.implementation"] == "diffusers"  # as sd-scripts writes SD 1.x/2.x LoRAs
    assert exported.files["kohya"].name == f"sks-run-{exported.case}.safetensors"


def test_model_card_says_which_file_is_for_which_tool(exported):
    card = exported.files["model_card"].read_text()
    assert f"`{export.DIFFUSERS_WEIGHT_NAME}`: " in card
    if exported.family in BAKED:  # ComfyUI loads FLUX and SD 3.5 files; Forge runs FLUX (its SD 3.5 support unclaimed)
        assert "one file for diffusers" in card and "ComfyUI" in card
        assert ("Forge" in card) is (exported.family == "flux")
    elif exported.family == "ldm256":
        assert 'pipeline.unet.load_lora_adapter(repo, weight_name="pytorch_lora_weights.safetensors", prefix="unet")' in card
        assert "do not run this model" in card
    else:
        kohya_line = next(line for line in card.splitlines() if exported.files["kohya"].name in line)
        assert "ComfyUI" in kohya_line and "A1111" in kohya_line and "Forge" in kohya_line
    assert "strength 1.0 is the trained strength" in card


@pytest.mark.parametrize(
    ("family", "prediction_type", "version", "v2", "architecture", "modelspec_prediction"),
    [
        ("sd2", "v_prediction", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),
        ("sd2", "epsilon", "sd_v2", "True", "stable-diffusion-v2-512/lora", "epsilon"),
        ("sd15", "epsilon", "sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
    ],
)
def test_sd_labels_follow_the_family_and_the_schedulers_prediction_type(
    tmp_path, family, prediction_type, version, v2, architecture, modelspec_prediction
):
    """A1111 files LoRAs under SD1/SD2 by ss_v2 and ss_base_model_version and hides those that do not match the
    loaded checkpoint. v-prediction comes from the scheduler, not from the resolution: an SD 2.x base (epsilon, 512)
    trained at 768 is still `sd_v2`, 512."""
    base = base_components(family)
    unet = add_trained_lora(copy.deepcopy(base["unet"]), UNET_LORA_TARGETS, seed=7)
    spec = make_spec(family).model_copy(update={"resolution": 768})
    files = export.export_lora(unet, None, spec, RunPaths(tmp_path, "r"), "h", family, prediction_type=prediction_type,
                               environ={})
    tensors, metadata = read_file(files["kohya"])
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == (v2, version)
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == modelspec_prediction
    assert metadata["modelspec.implementation"] == "diffusers"
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors

    pipeline = TinySD(copy.deepcopy(base))
    pipeline.load_lora_weights(str(files["kohya"].parent), weight_name=files["kohya"].name)
    difference = (outputs({"unet": pipeline.unet})["unet"] - outputs({"unet": unet})["unet"]).abs().max().item()
    assert difference < OUTPUT_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# SDXL's LDM block names, and the Hub push
# ---------------------------------------------------------------------------------------------------------


def reference_sd15_prefixes() -> dict[str, str]:
    """The table of diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, transcribed."""
    table = {}
    for i in range(4):
        for j in range(2):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{3 * i + j + 1}.0"
            if i < 3:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{3 * i + j + 1}.1"
        for j in range(3):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{3 * i + j}.0"
            if i > 0:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{3 * i + j}.1"
        if i < 3:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{3 * (i + 1)}.0.op"
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}"
    table["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        table[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return table


SDXL_CONFIG = SimpleNamespace(
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
SD15_CONFIG = SimpleNamespace(
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@pytest.mark.parametrize(("config", "reference"),
                         [(SDXL_CONFIG, reference_sdxl_prefixes), (SD15_CONFIG, lambda _: reference_sd15_prefixes())],
                         ids=["sdxl", "sd15"])
def test_ldm_block_mapping_matches_the_diffusers_reference_scripts(config, reference):
    mapping = lora_formats.unet_block_prefixes(config)
    for diffusers_prefix, ldm_prefix in reference(config).items():
        assert mapping[diffusers_prefix] == ldm_prefix, diffusers_prefix
    assert lora_formats.ldm_unet_module_name("down_blocks.1.resnets.0.time_emb_proj", mapping) == "input_blocks.4.0.emb_layers.1"
    assert lora_formats.ldm_unet_module_name("time_embedding.linear_1", mapping) == "time_embed.0"
    with pytest.raises(ValueError, match="no original-checkpoint name"):
        lora_formats.ldm_unet_module_name("down_blocks.9.attentions.0.to_q", mapping)


def test_kohya_naming_is_known_per_family():
    def unet_name(family, config, module):
        return lora_formats.kohya_unet_module_name(export.kohya_labels(family).unet_block_names, config)(module)

    assert unet_name("sd15", SD15_CONFIG, "down_blocks.0.attentions.1.proj_in") == "down_blocks.0.attentions.1.proj_in"
    assert unet_name("sd2", SD15_CONFIG, "down_blocks.0.attentions.1.proj_in") == "down_blocks.0.attentions.1.proj_in"
    assert unet_name("sdxl", SDXL_CONFIG, "down_blocks.1.attentions.1.proj_in") == "input_blocks.5.1.proj_in"
    with pytest.raises(ValueError, match="no kohya layout for family 'flux'"):
        export.kohya_labels("flux")


def test_hub_push_failure_is_reported_without_the_token(tmp_path):
    calls = []

    class FailingApi:
        def __init__(self, token):
            calls.append(("init", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            raise RuntimeError("401 Unauthorized for token hf_secret_value")

    result = export.push_to_hub(tmp_path, "me/my-lora", "hf_secret_value", create_api=FailingApi)
    assert not result.ok and "failed" in result.message
    assert "hf_secret_value" not in result.message
    assert calls[1] == ("create_repo", {"repo_id": "me/my-lora", "repo_type": "model", "private": True, "exist_ok": True})
    assert calls[2][1]["folder_path"] == str(tmp_path)
    assert not export.push_to_hub(tmp_path, "me/my-lora", None).ok  # no token: skipped, reported
