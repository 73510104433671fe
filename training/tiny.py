"""Tiny random-weight models in the diffusers folder layout, built in code (no hub download), and toy datasets.

Tests, `make demo` and the benchmark's CPU mode train these: same classes and folder layout as the real
SD 1.x / 2.x / SDXL / FLUX.1 / SD 3.5 / Kandinsky 2.2 / LDM checkpoints, so `training.models` and diffusers'
pipelines load them unchanged, but small enough that a training step on CPU takes a fraction of a second. Each
family builds its own (`ModelFamily.tiny_pipeline`, training/families/) from the parts here.

    python -m training.tiny --family sdxl --out /tmp/tiny-sdxl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from contract.families import FAMILY_NAMES

# torch, transformers and diffusers load inside the builders: `python -m training.tiny --help` answers at once.
if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import BertTokenizer, CLIPTextConfig, CLIPTokenizer, T5EncoderModel, T5Tokenizer

TEXT_WIDTH = 32  # hidden size of the tiny text encoders (a family whose real width tells it apart picks its own)
CLIP_MAX_LENGTH = 77  # as the real CLIP tokenizers: pipelines and training pad to it
T5_MAX_LENGTH = 32  # the real FLUX pads T5 to 512; a tiny model does not need to


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the characters a byte-level BPE vocabulary is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (every byte, plain and word-final; no merges): any text encodes."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [char + "</w>" for char in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """A character-level Unigram T5 tokenizer: pad, eos, unk, the word-start marker and printable ASCII."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + chr(code), -2.5) for code in range(ord("a"), ord("z") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def bert_tokenizer() -> BertTokenizer:
    """A character-level WordPiece tokenizer (lower-case, every printable ASCII character, word-initial and
    `##`-continued): any text encodes, as with the real uncased BERT vocabulary."""
    from transformers import BertTokenizer

    characters = [chr(code) for code in range(ord("!"), ord("~") + 1) if not chr(code).isupper()]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *(f"##{char}" for char in characters)]
    return BertTokenizer(vocab={token: index for index, token in enumerate(tokens)}, model_max_length=CLIP_MAX_LENGTH)


def clip_text_config(vocab_size: int, hidden_size: int = TEXT_WIDTH, **extra) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def t5_encoder(vocab_size: int, width: int = TEXT_WIDTH) -> T5EncoderModel:
    """A two-layer T5 encoder (FLUX's and SD 3's sequence encoder, thin)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config)


def vae(**extra) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    # Four blocks: the real models' 8x downscale, so latents and buckets have the real shapes, just thin.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
        **extra,
    )


def make_model(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight `family` model to `out` (diffusers layout, model_index.json at the top)."""
    import torch

    from training.families import family_for

    torch.manual_seed(seed)
    out = Path(out)
    family_for(family).save_tiny_model(out)
    return out


def make_dataset(directory: Path, n: int, seed: int = 0, caption_extension: str = ".txt") -> list[Path]:
    """`n` generated images of different aspect ratios, each with a caption file naming what it shows."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = [(320, 320), (480, 288), (288, 480), (400, 300), (300, 400), (512, 256)]
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    shapes = ["circle", "square", "stripe"]
    written = []
    for index in range(n):
        width, height = sizes[index % len(sizes)]
        colour = list(colours)[index % len(colours)]
        shape = shapes[index % len(shapes)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        left, top = rng.randrange(width // 3), rng.randrange(height // 3)
        box = (left, top, left + width // 2, top + height // 2)
        if shape == "circle":
            draw.ellipse(box, fill=colours[colour])
        elif shape == "square":
            draw.rectangle(box, fill=colours[colour])
        else:
            draw.rectangle((0, top, width, top + height // 6), fill=colours[colour])
        path = directory / f"image-{index:03d}.png"
        image.save(path)
        path.with_suffix(caption_extension).write_text(f"a {colour} {shape}, sample {index}")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILY_NAMES, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", type=Path, help="also write a toy dataset to this folder")
    parser.add_argument("--images", type=int, default=6, help="images in the toy dataset")
    args = parser.parse_args(argv)
    make_model(args.family, args.out, args.seed)
    print(json.dumps({"model": str(args.out), "family": args.family}))
    if args.dataset:
        make_dataset(args.dataset, args.images, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
