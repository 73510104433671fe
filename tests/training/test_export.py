"""LoRA export: diffusers file and kohya/webui file from tiny random-weight models, checked by loading both
back through diffusers' own loaders (which map the kohya file's LDM block names back to diffusers)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from peft import LoraConfig
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training import export
from contract.spec import TrainSpec
from contract.workspace import RunPaths

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
RANK, ALPHA = 4, 8


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
    # SD 1.5's shape in miniature: attention in every block but the last, one layer per block here
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


def clip(with_projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=1000, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


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
    )


class TinySDXL(StableDiffusionXLLoraLoaderMixin):
    """Just enough of a pipeline for diffusers' load_lora_weights (no tokenizers, VAE or scheduler)."""

    hf_device_map = None

    def __init__(self, unet, text_encoder, text_encoder_2):
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


class TinySD15(StableDiffusionLoraLoaderMixin):
    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(1, 32, generator=generator), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample


def text_output(encoder: CLIPTextModel) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[0, 5, 17, 99, 2]])).last_hidden_state


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    torch.manual_seed(0)
    base = {"unet": sdxl_unet().eval(), "text_encoder": clip().eval(), "text_encoder_2": clip(True).eval()}
    trained = {name: copy.deepcopy(model) for name, model in base.items()}
    add_trained_lora(trained["unet"], UNET_TARGETS, seed=1)
    add_trained_lora(trained["text_encoder"], TEXT_TARGETS, seed=2)
    add_trained_lora(trained["text_encoder_2"], TEXT_TARGETS, seed=3)
    paths = RunPaths(tmp_path_factory.mktemp("volume"), "run-sdxl")
    spec = make_spec("sdxl", train_text_encoder=True)
    encoders = {"text_encoder": trained["text_encoder"], "text_encoder_2": trained["text_encoder_2"]}
    files = export.export_lora(trained["unet"], encoders, spec, paths, "datahash123", "sdxl", environ={})
    return SimpleNamespace(base=base, trained=trained, files=files, paths=paths, spec=spec)


def fresh_sdxl(base) -> TinySDXL:
    return TinySDXL(*(copy.deepcopy(base[name]) for name in ("unet", "text_encoder", "text_encoder_2")))


def kohya_tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def test_sdxl_kohya_keys_use_original_block_names_and_training_alpha(sdxl):
    tensors, _ = kohya_tensors(sdxl.files["kohya"])
    unet_keys = [key for key in tensors if key.startswith("lora_unet_")]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k.alpha" in tensors
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v.lora_down.weight" in tensors
    assert any(key.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for key in tensors)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj.") for key in tensors)
    assert not [key for key in unet_keys if any(name in key for name in ("down_blocks", "up_blocks", "mid_block"))]
    alphas = [value for key, value in tensors.items() if key.endswith(".alpha")]
    assert alphas and all(value.item() == ALPHA for value in alphas)
    assert all(tensors[key].shape[0] == RANK for key in tensors if key.endswith("lora_down.weight"))


def test_sdxl_kohya_file_loads_in_diffusers_with_the_trained_effect(sdxl):
    expected_unet, expected_text = unet_output(sdxl.trained["unet"]), text_output(sdxl.trained["text_encoder_2"])
    assert not torch.allclose(expected_unet, unet_output(sdxl.base["unet"]), atol=1e-4)  # the LoRA matters

    from_kohya = fresh_sdxl(sdxl.base)
    from_kohya.load_lora_weights(str(sdxl.files["kohya"].parent), weight_name=sdxl.files["kohya"].name)
    torch.testing.assert_close(unet_output(from_kohya.unet), expected_unet, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(from_kohya.text_encoder_2), expected_text, atol=1e-5, rtol=1e-4)

    from_diffusers = fresh_sdxl(sdxl.base)
    from_diffusers.load_lora_weights(str(sdxl.paths.lora), weight_name=export.DIFFUSERS_WEIGHT_NAME)
    torch.testing.assert_close(unet_output(from_diffusers.unet), expected_unet, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        text_output(from_diffusers.text_encoder), text_output(sdxl.trained["text_encoder"]), atol=1e-5, rtol=1e-4
    )


def test_metadata_in_both_files(sdxl):
    _, kohya = kohya_tensors(sdxl.files["kohya"])
    _, diffusers_meta = kohya_tensors(sdxl.files["diffusers"])
    for metadata in (kohya, diffusers_meta):
        assert metadata["lorastack.data_hash"] == "datahash123"
        assert metadata["lorastack.family"] == "sdxl"
        assert metadata["lorastack.alpha"] == "8" and metadata["lorastack.rank"] == "4"
        assert TrainSpec.model_validate_json(metadata["lorastack.spec"]) == sdxl.spec
        assert metadata["lorastack.version"] == export.__version__
    assert kohya["ss_network_module"] == "networks.lora"
    assert (kohya["ss_network_dim"], kohya["ss_network_alpha"]) == ("4", "8")
    assert kohya["ss_base_model_version"] == "sdxl_base_v1-0"
    assert kohya["ss_resolution"] == "(512, 512)" and kohya["ss_steps"] == "10"
    assert len(kohya["sshs_model_hash"]) == 64
    adapter = json.loads(diffusers_meta[export.LORA_ADAPTER_METADATA_KEY])
    assert adapter["unet.lora_alpha"] == ALPHA and adapter["text_encoder_2.r"] == RANK
    assert sdxl.files["kohya"].name == "sks-run-sdxl.safetensors"
    assert not [p for p in sdxl.paths.lora.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp left over


def test_sd15_kohya_file_round_trips_through_diffusers(tmp_path):
    torch.manual_seed(0)
    base_unet, base_text = sd15_unet().eval(), clip().eval()
    unet = add_trained_lora(copy.deepcopy(base_unet), [*UNET_TARGETS, "proj_in", "conv1", "time_emb_proj"], seed=4)
    text = add_trained_lora(copy.deepcopy(base_text), TEXT_TARGETS, seed=5)
    paths = RunPaths(tmp_path, "run-sd15")
    files = export.export_lora(unet, {"text_encoder": text}, make_spec("sd15", train_text_encoder=True), paths, "h", "sd15", environ={})

    tensors, metadata = kohya_tensors(files["kohya"])
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    # one layer per block: block 1's layer follows block 0's downsampler (input_blocks.2)
    assert "lora_unet_input_blocks_3_1_proj_in.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_5_0_in_layers_2.lora_up.weight" in tensors  # a resnet's conv1
    assert "lora_unet_middle_block_2_emb_layers_1.lora_up.weight" in tensors  # a resnet's time_emb_proj
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k.alpha" in tensors
    assert any(key.startswith("lora_te_text_model_encoder_layers_") for key in tensors)
    assert not [key for key in tensors if any(name in key for name in ("down_blocks", "up_blocks", "mid_block"))]

    # diffusers' SD 1.5 loader maps LDM names only when given the UNet config (its SDXL loader passes it itself)
    loaded = TinySD15(copy.deepcopy(base_unet), copy.deepcopy(base_text))
    loaded.load_lora_weights(str(tmp_path), weight_name=f"runs/run-sd15/lora/{files['kohya'].name}", unet_config=base_unet.config)
    torch.testing.assert_close(unet_output(loaded.unet), unet_output(unet), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_output(loaded.text_encoder), text_output(text), atol=1e-5, rtol=1e-4)


def reference_sdxl_prefixes() -> dict[str, str]:
    """The table of diffusers' scripts/convert_diffusers_to_original_sdxl.py, transcribed."""
    table = {}
    for i in range(3):
        for j in range(2):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{3 * i + j + 1}.0"
            if i > 0:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{3 * i + j + 1}.1"
        for j in range(3):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{3 * i + j}.0"
            if i < 2:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{3 * i + j}.1"
        if i < 2:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{3 * (i + 1)}.0.op"
            table[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}"
    # the script's own correction: SDXL's up_blocks.0 has attention, so its upsampler comes third
    table["up_blocks.0.upsamplers.0"] = "output_blocks.2.2"
    table["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        table[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return table


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


@pytest.mark.parametrize(
    ("config", "reference"),
    [
        (
            SimpleNamespace(
                layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            ),
            reference_sdxl_prefixes(),
        ),
        (
            SimpleNamespace(
                layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            ),
            reference_sd15_prefixes(),
        ),
    ],
    ids=["sdxl", "sd15"],
)
def test_block_mapping_matches_the_diffusers_reference_scripts(config, reference):
    mapping = export.unet_block_prefixes(config)
    for diffusers_prefix, ldm_prefix in reference.items():
        assert mapping[diffusers_prefix] == ldm_prefix, diffusers_prefix
    assert export.ldm_unet_module_name("down_blocks.1.resnets.0.time_emb_proj", mapping) == "input_blocks.4.0.emb_layers.1"
    assert export.ldm_unet_module_name("time_embedding.linear_1", mapping) == "time_embed.0"
    with pytest.raises(ValueError, match="no original-checkpoint name"):
        export.ldm_unet_module_name("down_blocks.9.attentions.0.to_q", mapping)


def test_flux_writes_the_diffusers_file_only(tmp_path):
    torch.manual_seed(0)
    config = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    base = FluxTransformer2DModel(**config).eval()
    transformer = add_trained_lora(copy.deepcopy(base), ["to_q", "to_k", "to_v", "to_out.0"], seed=6)
    files = export.export_lora(transformer, None, make_spec("flux"), RunPaths(tmp_path, "run-flux"), "h", "flux", environ={})
    assert set(files) == {"diffusers", "model_card"}
    tensors, metadata = kohya_tensors(files["diffusers"])
    assert all(key.startswith("transformer.") for key in tensors)
    assert "not written" in metadata["lorastack.kohya"]

    class TinyFlux(FluxLoraLoaderMixin):
        hf_device_map = None
        text_encoder = None

        def __init__(self, transformer):
            self.transformer = transformer

        @property
        def components(self):
            return {"transformer": self.transformer}

    loaded = TinyFlux(copy.deepcopy(base))
    loaded.load_lora_weights(str(files["diffusers"].parent))

    def forward(model):
        generator = torch.Generator().manual_seed(0)
        inputs = dict(
            hidden_states=torch.randn(1, 16, 4, generator=generator),
            encoder_hidden_states=torch.randn(1, 3, 32, generator=generator),
            pooled_projections=torch.randn(1, 32, generator=generator),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(3, 3),
        )
        with torch.no_grad():
            return model(**inputs).sample

    torch.testing.assert_close(forward(loaded.transformer), forward(transformer), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(forward(base), forward(transformer), atol=1e-4)


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


def test_sd2_base_is_labelled_sd2_in_the_kohya_file(tmp_path):
    """SD 2.x trains through the sd15 path; A1111 files LoRAs under SD1/SD2 by ss_v2 and ss_base_model_version
    and by default hides those that do not match the loaded checkpoint, so an SD 2.x LoRA must not say sd_v1."""
    torch.manual_seed(0)
    sd2_shaped = sd15_unet()
    sd2_shaped.register_to_config(cross_attention_dim=1024)  # OpenCLIP ViT-H's width: what tells SD 2.x apart
    unet = add_trained_lora(sd2_shaped, UNET_TARGETS, seed=6)
    files = export.export_lora(unet, None, make_spec("sd15").model_copy(update={"resolution": 768}), RunPaths(tmp_path, "r"), "h", "sd15", environ={})
    _, metadata = kohya_tensors(files["kohya"])
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("True", "sd_v2")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"

    files = export.export_lora(add_trained_lora(sd15_unet(), UNET_TARGETS, seed=6), None, make_spec("sd15"), RunPaths(tmp_path, "s"), "h", "sd15", environ={})
    _, metadata = kohya_tensors(files["kohya"])
    assert (metadata["ss_v2"], metadata["ss_base_model_version"]) == ("False", "sd_v1")
