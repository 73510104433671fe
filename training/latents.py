"""VAE latents and text embeddings (and any conditioning a family takes from the image itself), computed once per
sample and cached on the volume.

The cache is keyed by what the features depend on (model, revision, resolution, buckets, dtype, data) and
holds one file per SAMPLE ID. A batch looks its samples up by id, so whatever order a shuffled sampler
draws them in, each image's latents travel with its own caption's embeddings (caches indexed by step
position pair them with the wrong captions as soon as the order changes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from contract.spec import TrainSpec
from contract.workspace import RunPaths, atomic_write_bytes
from training.data import PreparedDataset, Sample
from training.models import ModelBundle

FEATURES_VERSION = 1  # bump when what is cached, or how, changes: old caches are then not re-used
IMAGE_PREFIX = "image."  # cached conditioning computed from the image (ModelFamily.encode_image_conditioning)


def cache_key(spec: TrainSpec, data_hash: str, weight_dtype: torch.dtype) -> str:
    payload = {
        "version": FEATURES_VERSION,
        "family": spec.family,
        "baseModel": spec.base_model,
        "revision": spec.revision,
        "resolution": spec.resolution,
        "aspectBuckets": spec.aspect_buckets,
        "dataHash": data_hash,
        "dtype": str(weight_dtype),
        # a trained text encoder changes every step: then only latents are cached
        "text": not spec.train_text_encoder,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """One safetensors file per sample id under cache/<key>/, each written atomically.

    Read features are also kept in memory up to `memory_budget_bytes`: a LoRA dataset is small and read
    every epoch, and the network volume is slower than RAM (FLUX's T5 embeddings are 4 MB a sample).
    """

    def __init__(self, root: Path, memory_budget_bytes: int = 8 * 2**30):
        self.root = root
        self._memory_budget = memory_budget_bytes
        self._in_memory: dict[str, dict[str, torch.Tensor]] = {}
        self._in_memory_bytes = 0

    def file(self, sample_id: str) -> Path:
        return self.root / f"{sample_id}.safetensors"

    def __contains__(self, sample_id: str) -> bool:
        return self.file(sample_id).is_file()

    def put(self, sample_id: str, features: dict[str, torch.Tensor]) -> None:
        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in features.items()}
        atomic_write_bytes(self.file(sample_id), save(tensors))

    def get(self, sample_id: str) -> dict[str, torch.Tensor]:
        if sample_id in self._in_memory:
            return self._in_memory[sample_id]
        features = load_file(self.file(sample_id))
        size = sum(tensor.numel() * tensor.element_size() for tensor in features.values())
        if self._in_memory_bytes + size <= self._memory_budget:
            self._in_memory[sample_id] = features
            self._in_memory_bytes += size
        return features


def _sample_generator(spec: TrainSpec, sample: Sample) -> torch.Generator:
    """The VAE posterior draw for a cached sample depends only on the seed and the sample: reproducible."""
    digest = hashlib.sha256(f"{spec.seed}:{sample.id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def build_feature_cache(
    models: ModelBundle, dataset: PreparedDataset, spec: TrainSpec, paths: RunPaths
) -> tuple[FeatureCache, int]:
    """Encode every sample not yet in the cache; returns the cache and how many samples were encoded."""
    cache = FeatureCache(paths.cache / cache_key(spec, dataset.data_hash, models.weight_dtype))
    missing = [sample for sample in dataset.samples if sample.id not in cache]
    for sample in missing:
        pixels = dataset.pixels(sample)[None]
        features = {"latents": models.encode_images(pixels, _sample_generator(spec, sample))[0]}
        image = models.encode_image_conditioning(pixels)
        features.update({IMAGE_PREFIX + name: value[0] for name, value in image.items()})
        if not spec.train_text_encoder:
            with torch.no_grad():
                text = models.encode_text(models.tokenize([sample.caption]))
            features.update({name: value[0] for name, value in text.items()})
        cache.put(sample.id, features)
    return cache, len(missing)


@dataclass
class Batch:
    """One micro-batch: cached features where there are some, pixels and captions to encode otherwise."""

    sample_ids: list[str]
    captions: list[str]
    latents: torch.Tensor | None  # (B, C, h, w), cached
    pixels: torch.Tensor | None  # (B, 3, H, W) in [-1, 1], when latents are encoded on the fly
    text: dict[str, torch.Tensor] | None  # cached text conditioning, by name
    time_ids: torch.Tensor  # (B, 6): SDXL's original size, crop top-left, target size
    image: dict[str, torch.Tensor] | None = None  # cached conditioning computed from the images, by name


def collate(dataset: PreparedDataset, indices: list[int], cache: FeatureCache | None) -> Batch:
    samples = [dataset.samples[index] for index in indices]
    time_ids = torch.tensor(
        [[*s.original_size, *s.crop_top_left, s.bucket[1], s.bucket[0]] for s in samples], dtype=torch.float32
    )
    batch = Batch(
        sample_ids=[s.id for s in samples],
        captions=[s.caption for s in samples],
        latents=None,
        pixels=None,
        text=None,
        time_ids=time_ids,
    )
    if cache is None:
        batch.pixels = torch.stack([dataset.pixels(s) for s in samples])
        return batch
    features = [cache.get(s.id) for s in samples]
    batch.latents = torch.stack([f["latents"] for f in features])
    image_names = [name for name in features[0] if name.startswith(IMAGE_PREFIX)]
    text_names = [name for name in features[0] if name != "latents" and name not in image_names]
    if text_names:
        batch.text = {name: torch.stack([f[name] for f in features]) for name in text_names}
    if image_names:
        batch.image = {name.removeprefix(IMAGE_PREFIX): torch.stack([f[name] for f in features]) for name in image_names}
    return batch
