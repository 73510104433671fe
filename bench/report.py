"""Where the numbers go: bench/results/<gpu>.json, bench/results/flops.json and the tables in bench/README.md."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

import accelerate
import diffusers
import peft
import torch
import transformers

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
FLOPS_FILE = "flops.json"
TABLE_START, TABLE_END = "<!-- results:start (python -m bench writes this part) -->", "<!-- results:end -->"

# Dense (no 2:4 sparsity) BF16 tensor-core peak with FP32 accumulation (what torch's bf16 matmuls use), TFLOP/s,
# from NVIDIA's product datasheets (data-center cards) and architecture whitepapers (GeForce: Ada, GA102).
# Keys are torch.cuda.get_device_name(), which are also RunPod's GPU ids.
BF16_DENSE_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L4": 121.0,
    "NVIDIA A40": 149.7,
    "NVIDIA RTX A6000": 154.8,
    "NVIDIA GeForce RTX 4090": 165.2,  # GeForce Ada runs FP32-accumulate tensor math at half the FP16-accumulate rate
    "NVIDIA GeForce RTX 3090": 71.0,  # likewise on GeForce Ampere
}


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def environment(device: torch.device, size: str) -> dict[str, object]:
    """What produced a results file: device, driver, library versions, the date."""
    described: dict[str, object] = {
        "device": device.type,
        "size": size,
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        **versions(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(properties.total_memory / 2**30, 2),
            driver=_nvidia_driver(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        described.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return described


def completed_stacks(path: Path) -> set[str]:
    """The stacks a results file holds every measurement of (an earlier run finished them)."""
    return set(json.loads(path.read_text()).get("completed_stacks", [])) if path.exists() else set()


def merged_flops(path: Path, counts: list[dict]) -> list[dict]:
    """The counts of this run, and the earlier file's counts of the stacks it did not count."""
    counted = {count["stack"] for count in counts}
    previous = json.loads(path.read_text())["counts"] if path.exists() else []
    return [*(count for count in previous if count["stack"] not in counted), *counts]


def results_name(environment: dict[str, object]) -> str:
    """nvidia-h100-80gb-hbm3.json for a full-size GPU run; *-tiny.json (not committed) for the smoke run."""
    device = str(environment["gpu"] or "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{slug}{'-tiny' if environment['size'] == 'tiny' else ''}.json"


def _row_key(row: dict) -> tuple:
    return (row["stack"], row["variant"], row["batch_size"])


def write_results(path: Path, environment: dict[str, object], rows: list[dict], done: str | None = None) -> dict:
    """Rows replace the earlier rows of the same stack, variant and batch size: a partial run updates its part.
    `done`: a stack all of whose measurements are now in the file (`completed_stacks`: a retry skips it).

    The checks are judged again on all the rows the file then holds.
    """
    previous = json.loads(path.read_text()) if path.exists() else {"rows": []}
    kept = {_row_key(row): row for row in previous["rows"]}
    kept.update({_row_key(row): row for row in rows})
    merged = list(kept.values())
    completed = [*previous.get("completed_stacks", []), *([done] if done else [])]
    document = {"environment": environment, "rows": merged, "checks": checks(merged),
                "completed_stacks": sorted(set(completed))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def checks(rows: list[dict]) -> list[dict]:
    """The issue's targets, judged on the rows at hand (a target without its rows is not reported)."""
    judged = []
    sdxl_4090 = [r for r in rows if r["stack"] == "sdxl-4090" and r["variant"] == "baseline" and r["batch_size"] == 1]
    for row in sdxl_4090:
        if "peak_memory_gib" in row:
            judged.append({
                "target": "sdxl-4090 settings at batch 1 peak at most 22 GiB (torch.cuda.max_memory_allocated)",
                "value": row["peak_memory_gib"] if row["status"] == "ok" else row["status"],
                "met": row["status"] == "ok" and row["peak_memory_gib"] <= 22.0,
            })
    sdxl = [r for r in rows if r["family"] == "sdxl" and r["status"] == "ok" and r.get("mfu") is not None]
    if sdxl:
        best = max(sdxl, key=lambda r: r["mfu"])
        judged.append({
            "target": "SDXL LoRA at 1024 reaches at least 40% MFU at its best batch size",
            "value": f"{best['mfu']:.1%} ({best['variant']}, batch {best['batch_size']})",
            "met": best["mfu"] >= 0.40,
        })
    return judged


# --------------------------------------------------------------------------------------------- README


def _tflop(flops: float) -> str:
    return f"{flops / 1e12:.3g}"


def flops_table(document: dict) -> list[str]:
    lines = [
        f"FLOPs per image, counted on the meta device ({document['method']}). Quoted: the issue's figures.",
        "",
        "| family | stack | resolution | rank | settings | forward (frozen model) | forward with LoRA "
        "| forward + backward | quoted forward | quoted total | total vs quoted |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in document["counts"]:
        quoted = entry.get("quoted")
        flops = entry["flops"]
        difference = f"{flops['total'] / (quoted['total'] * 1e12) - 1:+.1%}" if quoted else ""
        lines.append(
            f"| {entry['family']} | {entry['stack']} | {entry['resolution']} | {entry['rank']} | {entry['settings']} "
            f"| {_tflop(flops['base_forward'])} | {_tflop(flops['forward'])} | {_tflop(flops['total'])} "
            f"| {quoted['forward'] if quoted else ''} | {quoted['total'] if quoted else ''} | {difference} |"
        )
    return lines


def timing_table(document: dict) -> list[str]:
    env = document["environment"]
    lines = [
        f"### {env['gpu']} ({env['gpu_memory_gib']} GiB), driver {env['driver']}, CUDA {env['cuda']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, {env['date']}",
        "",
        "| stack | variant | batch | checkpointing | s/step (median) | images/s | peak GiB | TFLOP/step | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(document["rows"], key=lambda r: (r["stack"], r["variant"], r["batch_size"])):
        if row["status"] != "ok":
            lines.append(f"| {row['stack']} | {row['variant']} | {row['batch_size']} | | {row['status']} | | | | |")
            continue
        largest = " (largest)" if row.get("largest_batch") else ""
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else ""
        lines.append(
            f"| {row['stack']} | {row['variant']} | {row['batch_size']}{largest} "
            f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['seconds_per_step']:.3f} "
            f"| {row['images_per_second']:.2f} | {row['peak_memory_gib']:.1f} | {_tflop(row['flops_per_step'])} "
            f"| {mfu} |"
        )
    for check in document["checks"]:
        lines.append(f"\n- {'met' if check['met'] else 'NOT met'}: {check['target']}: {check['value']}")
    return lines


def render_readme(results_dir: Path = RESULTS_DIR, readme: Path = README) -> None:
    """Rewrite the README's results part from the committed results (smoke runs on tiny models excluded)."""
    lines: list[str] = []
    flops = results_dir / FLOPS_FILE
    if flops.exists():
        lines += flops_table(json.loads(flops.read_text()))
    for path in sorted(results_dir.glob("*.json")):
        document = json.loads(path.read_text())
        environment = document.get("environment", {})
        if environment.get("device") == "cuda" and environment.get("size") == "full":
            lines += ["", *timing_table(document)]
    if not any(line.startswith("### ") for line in lines):
        lines += ["", "No GPU measurements yet: run `make bench` on a GPU machine."]
    text = readme.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    readme.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])
