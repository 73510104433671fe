"""The feature cache: per sample id, so a shuffled sampler still pairs each image with its own caption."""

from __future__ import annotations

import torch

from contract.workspace import RunPaths
from training.data import BucketBatchSampler, prepare_dataset
from training.latents import _sample_generator, build_feature_cache, collate
from training.models import load_models

from .helpers import make_spec


def test_cached_features_follow_their_sample_under_a_shuffled_sampler(tiny_model, toy_images, workspace):
    spec = make_spec("sdxl", tiny_model("sdxl"), toy_images, aspectBuckets=False, batchSize=2)
    paths = RunPaths(workspace, "r")
    dataset = prepare_dataset(spec, paths)
    models = load_models(spec, torch.device("cpu"))
    cache, encoded = build_feature_cache(models, dataset, spec, paths)
    assert encoded == len(dataset.samples)

    sampler = BucketBatchSampler([s.bucket for s in dataset.samples], 2, 1, seed=spec.seed)
    first_epoch = [sampler.next_batch() for _ in range(3)]
    second_epoch = [sampler.next_batch() for _ in range(3)]
    # Different orders in the two epochs: a cache indexed by step position would hand epoch two's batches
    # the features of whatever epoch one drew at that position.
    assert first_epoch != second_epoch

    for indices in first_epoch + second_epoch:
        batch = collate(dataset, indices, cache)
        captions = [dataset.samples[i].caption for i in indices]
        assert batch.captions == captions
        with torch.no_grad():
            expected_text = models.encode_text(models.tokenize(captions))
        torch.testing.assert_close(batch.text["prompt_embeds"], expected_text["prompt_embeds"])
        torch.testing.assert_close(batch.text["pooled_prompt_embeds"], expected_text["pooled_prompt_embeds"])
        for row, index in enumerate(indices):
            sample = dataset.samples[index]
            latents = models.encode_images(dataset.pixels(sample)[None], _sample_generator(spec, sample))
            torch.testing.assert_close(batch.latents[row], latents[0])
            assert batch.time_ids[row].tolist() == [*sample.original_size, *sample.crop_top_left, 256, 256]


def test_second_build_encodes_nothing_and_a_trained_text_encoder_caches_latents_only(tiny_model, toy_images, workspace):
    spec = make_spec("sd15", tiny_model("sd15"), toy_images)
    paths = RunPaths(workspace, "r")
    dataset = prepare_dataset(spec, paths)
    models = load_models(spec, torch.device("cpu"))
    first, encoded = build_feature_cache(models, dataset, spec, paths)
    again, encoded_again = build_feature_cache(models, dataset, spec, paths)
    assert (encoded, encoded_again) == (6, 0) and again.root == first.root

    with_encoder = make_spec("sd15", tiny_model("sd15"), toy_images, trainTextEncoder=True)
    latents_only, _ = build_feature_cache(load_models(with_encoder, torch.device("cpu")), dataset, with_encoder, paths)
    assert latents_only.root != first.root
    assert set(latents_only.get(dataset.samples[0].id)) == {"latents"}
    batch = collate(dataset, [0], latents_only)  # sample 0 is square: 256x256 -> 32x32 latents
    assert batch.text is None and batch.latents.shape == (1, 4, 32, 32)


def test_sdxl_latents_encoded_during_a_step_keep_the_fp32_vae_out_of_autocast(tiny_model):
    """SDXL's VAE is kept in fp32 (it overflows in fp16); the training step runs under the mixed-precision
    autocast, and latents encoded there (cacheLatents: false) must still come from the fp32 VAE."""
    spec = make_spec("sdxl", tiny_model("sdxl"), tiny_model("sdxl"))
    models = load_models(spec, torch.device("cpu"))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    expected = models.encode_images(pixels, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        during_step = models.encode_images(pixels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(during_step, expected)
