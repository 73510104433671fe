"""The dataset benchmark end to end on a few images: its results file and the targets it judges."""

from __future__ import annotations

import json

from bench import dataset as bench_dataset


def test_dataset_bench_writes_its_figures_and_judges_the_targets(tmp_path):
    results = tmp_path / "dataset-cpu.json"
    bench_dataset.main(["--images", "4", "--second-look-images", "12", "--repeats", "1", "--results", str(results),
                        "--no-readme"])
    document = json.loads(results.read_text())
    assert {row["resolution"] for row in document["prepare"]} == {1024, 512}
    assert all(row["images"] == 4 and row["images_per_core_second"] > 0 for row in document["prepare"])
    assert [row["source"] for row in document["peak_memory"]] == ["10000x10 JPEG", "10000x10 PNG", "1024x1024 JPEG"]
    assert document["second_look"]["images"] == 12
    assert len(document["checks"]) == len([r for r in document["prepare"] if r["workers"] == 1]) + 2
    assert document["machine"]["pillow"] and document["machine"]["cpus_usable"] >= 1
    section = "\n".join(bench_dataset.readme_section(document))
    assert "Second look at an unchanged, prepared 12-image folder" in section
