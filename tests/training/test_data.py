"""Datasets: sources (folder, zip over HTTP, refused archives), captions, aspect buckets, the volume cache,
and the batch sampler's exact resume."""

from __future__ import annotations

import functools
import http.server
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from bench.dataset import peak_memory
from contract.workspace import RunPaths
from training.data import (
    BucketBatchSampler,
    DatasetError,
    aspect_buckets,
    fit_to_bucket,
    nearest_bucket,
    prepare_dataset,
    safe_extract,
)

from .helpers import make_spec


def test_buckets_are_multiples_of_64_with_about_the_target_area():
    for resolution in (256, 512, 1024):
        buckets = aspect_buckets(resolution)
        assert (resolution, resolution) in buckets
        for width, height in buckets:
            assert width % 64 == 0 and height % 64 == 0
            assert 0.75 * resolution**2 <= width * height <= resolution**2
            assert max(width, height) <= 2 * min(width, height)


@pytest.mark.parametrize(
    ("size", "orientation"), [((1600, 900), "landscape"), ((900, 1600), "portrait"), ((800, 810), "square")]
)
def test_nearest_bucket_keeps_the_orientation_and_close_aspect_ratio(size, orientation):
    width, height = nearest_bucket(*size, aspect_buckets(1024))
    if orientation == "landscape":
        assert width > height
    elif orientation == "portrait":
        assert height > width
    else:
        assert width == height
    assert abs(width / height - size[0] / size[1]) < 0.15


def test_fit_to_bucket_crops_only_the_excess_along_one_side():
    image = Image.new("RGB", (1600, 900))
    fitted, (top, left) = fit_to_bucket(image, (1344, 768))
    assert fitted.size == (1344, 768)
    assert top == 0 and 0 < left < 20  # 16:9 into 7:4: a few pixels trimmed from the sides, none from the top


def test_folder_dataset_has_buckets_by_aspect_ratio_and_trigger_word_captions(toy_images, workspace):
    spec = make_spec("sd15", Path("unused"), toy_images, triggerWord="zqx")
    dataset = prepare_dataset(spec, RunPaths(workspace, "r"))
    assert len(dataset.samples) == 6 and not dataset.reused
    by_source = {}
    for sample in dataset.samples:
        assert sample.caption.startswith("zqx, a ")
        with Image.open(dataset.root / sample.file) as image:
            assert image.size == sample.bucket
        by_source[sample.original_size] = sample.bucket
    assert by_source[(288, 480)] == (320, 192)  # landscape 480x288 -> landscape bucket
    assert by_source[(480, 288)] == (192, 320)  # portrait -> portrait bucket
    assert by_source[(320, 320)] == (256, 256)
    pixels = dataset.pixels(dataset.samples[0])
    assert pixels.shape[0] == 3 and -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_without_aspect_buckets_every_image_is_a_centre_cropped_square(toy_images, workspace):
    spec = make_spec("sd15", Path("unused"), toy_images, aspectBuckets=False)
    dataset = prepare_dataset(spec, RunPaths(workspace, "r"))
    assert {sample.bucket for sample in dataset.samples} == {(256, 256)}


def test_second_preparation_reuses_the_prepared_dataset(toy_images, workspace):
    spec = make_spec("sd15", Path("unused"), toy_images)
    first = prepare_dataset(spec, RunPaths(workspace, "a"))
    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    second = prepare_dataset(spec, RunPaths(workspace, "b"))
    assert second.reused and second.root == first.root and second.samples == first.samples
    assert (second.root / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (workspace / "datasets").iterdir()] == [first.data_hash]  # no temp dirs left


def test_changed_caption_is_a_new_dataset(toy_images, tmp_path, workspace):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in toy_images.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    spec = make_spec("sd15", Path("unused"), copy)
    first = prepare_dataset(spec, RunPaths(workspace, "a"))
    (copy / "image-000.txt").write_text("a different caption")
    second = prepare_dataset(spec, RunPaths(workspace, "a"))
    assert second.data_hash != first.data_hash and not second.reused


def test_images_without_caption_files_get_the_default_caption(tmp_path, workspace):
    Image.new("RGB", (300, 300), "red").save(tmp_path / "lonely.jpg")
    spec = make_spec("sd15", Path("unused"), tmp_path, dataset={"source": str(tmp_path), "defaultCaption": "a photo"})
    (sample,) = prepare_dataset(spec, RunPaths(workspace, "a")).samples
    assert sample.caption == "a photo"


def test_empty_folder_is_a_clear_error(tmp_path, workspace):
    spec = make_spec("sd15", Path("unused"), tmp_path)
    with pytest.raises(DatasetError, match="no images"):
        prepare_dataset(spec, RunPaths(workspace, "a"))


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server over a folder: the URL of that folder."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_zip_over_http_is_downloaded_once_and_gives_the_same_dataset(toy_images, http_folder, workspace):
    served, base_url = http_folder
    with zipfile.ZipFile(served / "toy.zip", "w") as bundle:
        for file in sorted(toy_images.iterdir()):
            bundle.write(file, f"toy/{file.name}")
    spec = make_spec("sd15", Path("unused"), toy_images, dataset={"source": f"{base_url}/toy.zip"})
    from_zip = prepare_dataset(spec, RunPaths(workspace, "a"))
    from_folder = prepare_dataset(make_spec("sd15", Path("unused"), toy_images), RunPaths(workspace, "a"))
    assert [s.caption for s in from_zip.samples] == [s.caption for s in from_folder.samples]
    assert len(from_zip.samples) == 6

    (served / "toy.zip").unlink()  # a second run must not need the server
    again = prepare_dataset(spec, RunPaths(workspace, "b"))
    assert again.reused and again.data_hash == from_zip.data_hash


def test_missing_archive_url_is_a_clear_error(http_folder, workspace, toy_images):
    _, base_url = http_folder
    spec = make_spec("sd15", Path("unused"), toy_images, dataset={"source": f"{base_url}/nothing.zip"})
    with pytest.raises(DatasetError, match="HTTP 404"):
        prepare_dataset(spec, RunPaths(workspace, "a"))


def test_zip_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("ok/a.txt", "fine")
        bundle.writestr("../../escaped.txt", "not fine")
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(DatasetError, match="outside"):
        safe_extract(archive, destination)
    assert not (tmp_path / "escaped.txt").exists()


def test_tar_with_path_traversal_is_refused(tmp_path):
    import io
    import tarfile

    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as bundle:
        data = b"not fine"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(data)
        bundle.addfile(member, io.BytesIO(data))
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(DatasetError):
        safe_extract(archive, destination)
    assert not (tmp_path / "escaped.txt").exists()


def test_sampler_batches_come_from_one_bucket_and_cover_every_repeat():
    buckets = [(256, 256)] * 5 + [(320, 192)] * 3
    sampler = BucketBatchSampler(buckets, batch_size=2, repeats=2, seed=1)
    epoch = sampler.epoch_batches(0)
    drawn = [index for batch in epoch for index in batch]
    assert sorted(drawn) == sorted(list(range(8)) * 2)
    for batch in epoch:
        assert len({buckets[index] for index in batch}) == 1
    assert sampler.epoch_batches(1) != epoch  # reshuffled every epoch


def test_sampler_resumes_exactly_from_a_saved_position():
    buckets = [(256, 256)] * 4 + [(320, 192)] * 3
    reference = BucketBatchSampler(buckets, 2, 1, seed=3)
    expected = [reference.next_batch() for _ in range(13)]

    first = BucketBatchSampler(buckets, 2, 1, seed=3)
    head = [first.next_batch() for _ in range(6)]
    resumed = BucketBatchSampler(buckets, 2, 1, seed=3)
    resumed.load_state_dict(first.state_dict())
    tail = [resumed.next_batch() for _ in range(7)]
    assert head + tail == expected


def test_hugging_face_dataset_id_uses_a_snapshot_with_imagefolder_metadata(tmp_path, workspace, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "train").mkdir(parents=True)
    for index, size in enumerate([(300, 200), (200, 300)]):
        Image.new("RGB", size, "blue").save(snapshot / "train" / f"{index}.png")
    (snapshot / "train" / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "prompt": "a wide blue card"}\n{"file_name": "1.png", "prompt": "a tall blue card"}\n'
    )
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["repo_type"], kwargs["cache_dir"]))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = {"source": "hf://someone/cards", "captionColumn": "prompt"}
    spec = make_spec("sd15", Path("unused"), tmp_path, dataset=source)
    paths = RunPaths(workspace, "a")
    dataset = prepare_dataset(spec, paths)
    assert calls == [("someone/cards", "dataset", paths.hf_home / "hub")]
    captions_and_buckets = [(s.caption, s.bucket) for s in dataset.samples]
    assert captions_and_buckets == [("a wide blue card", (320, 192)), ("a tall blue card", (192, 320))]


def test_unreachable_hugging_face_dataset_is_a_clear_error(workspace, monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    spec = make_spec("sd15", Path("unused"), tmp_path, dataset={"source": "someone/cards"})
    with pytest.raises(DatasetError, match="'someone/cards' could not be downloaded .OSError: network is unreachable"):
        prepare_dataset(spec, RunPaths(workspace, "a"))


# ----------------------------------------------------------------------------- images and their captions


def prepared_pixels(folder: Path, workspace: Path, **overrides) -> dict[str, np.ndarray]:
    """source file name -> its prepared image as an array."""
    dataset = prepare_dataset(make_spec("sd15", Path("unused"), folder, **overrides), RunPaths(workspace, "a"))
    manifest = json.loads((dataset.root / "manifest.json").read_text())
    sources = {item["id"]: item["source"] for item in manifest["samples"]}
    pixels = {}
    for sample in dataset.samples:
        with Image.open(dataset.root / sample.file) as image:
            pixels[sources[sample.id]] = np.asarray(image.convert("RGB"))
    return pixels


def test_a_16_bit_png_keeps_its_brightness(tmp_path, workspace):
    levels = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (256, 1))  # a dark-to-light ramp
    Image.fromarray(levels).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as reopened:
        assert reopened.mode == "I;16"
    Image.fromarray((levels // 257).astype(np.uint8)).save(tmp_path / "plain.png")
    pixels = prepared_pixels(tmp_path, workspace)
    assert abs(pixels["deep.png"].mean() - pixels["plain.png"].mean()) < 2  # not clipped to near-white
    assert pixels["deep.png"].mean() == pytest.approx(127.5, abs=3)


def test_an_exif_rotated_photo_is_decoded_at_reduced_scale_and_prepared_upright(tmp_path, workspace, monkeypatch):
    # stored sideways (1536x768) with EXIF orientation 6: upright it is 768x1536, red on top, blue below
    upright = Image.new("RGB", (768, 1536), "blue")
    upright.paste("red", (0, 0, 768, 768))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    decoded_sizes = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def draft(image, mode, size):
        answer = real_draft(image, mode, size)
        decoded_sizes.append(image.size)
        return answer

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    (sample,) = prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a")).samples
    assert sample.original_size == (1536, 768) and sample.bucket == (192, 320)
    assert decoded_sizes == [(384, 192)]  # a quarter of each side, still covering the 320x192 bucket (stored sideways)
    pixels = prepared_pixels(tmp_path, workspace)["sideways.jpg"]
    assert pixels[:150].mean(axis=(0, 1)) == pytest.approx([254, 0, 0], abs=6)
    assert pixels[-150:].mean(axis=(0, 1)) == pytest.approx([0, 0, 254], abs=6)


def test_transparency_is_composited_on_white(tmp_path, workspace):
    Image.new("RGBA", (256, 256), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert prepared_pixels(tmp_path, workspace)["clear.png"].min() == 255


def test_an_extreme_aspect_ratio_gets_the_widest_bucket_from_the_middle_of_the_strip(tmp_path, workspace):
    strip = Image.new("RGB", (10000, 10), "black")
    strip.paste("white", (4990, 0, 5010, 10))  # the middle 20 px: all that a 2:1 crop keeps
    strip.save(tmp_path / "strip.png")
    (sample,) = prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a")).samples
    assert sample.bucket == max(aspect_buckets(256), key=lambda bucket: bucket[0] / bucket[1])
    assert prepared_pixels(tmp_path, workspace)["strip.png"].mean() > 250


def test_a_10000x10_image_prepares_in_memory_bounded_by_the_bucket(tmp_path):
    Image.new("RGB", (10000, 10), "gray").save(tmp_path / "strip.jpg")
    measured = peak_memory(tmp_path / "strip.jpg", 1024)  # a fresh process; Pillow's memory is not Python's
    assert measured["bucket"] == [1408, 704]
    assert measured["peak_growth_mib"] < 50  # cut before resizing: a 1408x704 image, not a 704000x704 one


@pytest.mark.parametrize("limit", [50_000, 10_000])  # Pillow warns past its limit, and raises past twice it
def test_an_image_past_the_pixel_limit_is_refused_naming_the_file(tmp_path, workspace, monkeypatch, limit):
    Image.new("RGB", (300, 300), "red").save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(DatasetError, match=r"^huge.png in .*90000 pixels.*[dD]ownscale the image"):
        prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a"))


def test_a_truncated_jpeg_is_named(tmp_path, workspace):
    Image.new("RGB", (300, 300), "red").save(tmp_path / "good.jpg")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"^cut.jpg in .*: not a readable image .*truncated"):
        prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a"))


def test_a_caption_that_is_not_utf8_is_named(tmp_path, workspace):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "card.png")
    (tmp_path / "card.txt").write_bytes("a café".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"^card.txt in .*: not UTF-8 text \(byte 5 is b'\\xe9'\); save it as UTF-8"):
        prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a"))


def test_byte_order_marks_are_not_part_of_captions(tmp_path, workspace):
    for name, encoded in (("utf8", "\ufeffa red card".encode()), ("utf16", "a red card".encode("utf-16"))):
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(encoded)
    spec = make_spec("sd15", Path("unused"), tmp_path, triggerWord="zqx")
    captions = [sample.caption for sample in prepare_dataset(spec, RunPaths(workspace, "a")).samples]
    assert captions == ["zqx, a red card", "zqx, a red card"]


def test_metadata_csv_with_a_byte_order_mark_gives_captions(tmp_path, workspace):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "card.png")
    (tmp_path / "metadata.csv").write_bytes("\ufefffile_name,text\ncard.png,a red card\n".encode())
    (sample,) = prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a")).samples
    assert sample.caption == "a red card"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"file_name": "card.png", "text": "caf\xe9"}\n'.encode("latin-1"), r"metadata.jsonl in .*: not UTF-8 text"),
        (b'{"file_name": "card.png", "text": "fine"}\n{"file_name": \n', r"metadata.jsonl in .*, line 2: not JSON"),
    ],
)
def test_a_broken_metadata_file_is_named(tmp_path, workspace, content, error):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "card.png")
    (tmp_path / "metadata.jsonl").write_bytes(content)
    with pytest.raises(DatasetError, match=error):
        prepare_dataset(make_spec("sd15", Path("unused"), tmp_path), RunPaths(workspace, "a"))
