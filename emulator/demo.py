"""`make demo` (`python -m emulator.demo`): the whole flow on a laptop, no cloud account, no GPU.

1. The RunPod emulator starts, with pods that run for real (emulator/pods.py), and a local S3 server standing in
   for RunPod's S3 API for network volumes (emulator/volume_buckets.py).
2. A tiny random-weight SD 1.5 is made and put on the demo volume (standing in for a base model on the Hub), and
   a few generated, captioned images are made in a local folder, which the demo stack names as its dataset.
3. The demo stack (stacks/Pulumi.demo.yaml, `wait: true`) goes up through the real program and providers:
   the dataset folder is uploaded to the volume through the S3 API (a DatasetUpload resource), then the pod starts;
   all through emulator/stack_driver.py, which runs the program as Pulumi's language host runs it and the
   providers in the SDK's own dynamic-provider host (emulator/language_host.py; docs/engine.md says what of
   the Pulumi CLI it does not reproduce).
   The emulated pod runs `python -m training`, trains, samples, saves the LoRA on the volume and stops itself; `up`
   follows it, downloads the LoRA, samples and history to outputs/demo/ and renders the run's report there.
4. The demo prints where the LoRA is, steps, loss, billed seconds and cost, and the overhead ratio (billed
   seconds / seconds the trainer process ran; asserted below 1.10), then destroys the stack, checks that
   nothing is left running or billing, and prints the report's path.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

MAX_OVERHEAD_RATIO = 1.10
STACK = "demo"
DATASET_IMAGES = 4


def make_seed(folder: Path) -> Path:
    """The tiny model the demo stack names under /workspace (models/tiny-sd15)."""
    from training import tiny

    tiny.make_model("sd15", folder / "models" / "tiny-sd15")
    return folder


def make_local_dataset(folder: Path) -> Path:
    """Generated, captioned images in a folder on this machine: the dataset `up` uploads to the volume."""
    from training import tiny

    tiny.make_dataset(folder, DATASET_IMAGES)
    return folder


SAMPLING = {"samplePrompts": ["demo, a red circle", "demo, a blue square"], "sampleEvery": 2}


def train_override(folder: Path) -> dict:
    """The demo stack's `lorastack:train` with its dataset source pointing at a local folder, and sample prompts
    for the report's grids (the e2e tests, which share the stack file, train without them: sampling the tiny
    model on a CPU costs seconds each time)."""
    import yaml

    from infra.stack_files import stack_file

    train = (yaml.safe_load(stack_file(STACK).read_text()) or {})["config"]["lorastack:train"]
    return {"lorastack:train": {**train, **SAMPLING, "dataset": {**train["dataset"], "source": str(folder)}}}


def start_s3_api():
    """A local S3 server standing in for RunPod's S3 API (for the rest of this process): the emulator's volumes
    as buckets (emulator/volume_buckets.py); its address and a key pair (it takes any) in the environment, where
    the providers read them, as they read RUNPOD_API_KEY."""
    from emulator.volume_buckets import EMULATOR_KEYS, S3Server, VolumeBuckets
    from infra.runpod_backend import s3 as runpod_s3

    url = S3Server().__enter__()  # a daemon thread: it ends with the demo
    os.environ.update({runpod_s3.ENDPOINT_ENV: url, runpod_s3.ACCESS_KEY_ENV: EMULATOR_KEYS[0],
                       runpod_s3.SECRET_KEY_ENV: EMULATOR_KEYS[1]})
    print(f"      RunPod's S3 API for network volumes: a local S3 server on {url}", flush=True)
    return VolumeBuckets(url)


def overhead_ratio(bill) -> tuple[float, float]:
    """(billed seconds / seconds the trainer processes ran, those seconds): all that is billed beyond the
    trainer's own run (provisioning, a pod left running after the trainer, restarts) raises it."""
    trained = sum(run.seconds(run.ended or time.monotonic()) for run in bill.containers)
    return bill.closed_seconds / trained, trained


def _save_pod_logs(api, path: Path) -> None:
    """Every pod's log in one file, for a look after the demo (the trainer's output is not echoed)."""
    with api.lock:
        lines = [f"{pod.id} {line.ts} {line.source}: {line.line}" for pod in api.pods.values() for line in pod.logs]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the emulator's volumes and state here (default: a temp dir)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorastack-demo-"))

    from emulator.pods import ProcessRuntime
    from emulator.runpod import RunpodApi
    from emulator.server import serve
    from emulator.stack_driver import StackDriver
    from infra.runpod_backend.follow import ENV_VOLUME_MOUNTS

    print(f"lorastack demo: everything happens under {workdir}, offline", flush=True)
    print(f"[1/4] making a tiny SD 1.5 and {DATASET_IMAGES} captioned images ...", flush=True)
    seed = make_seed(workdir / "seed")
    dataset = make_local_dataset(workdir / "dataset")
    runtime = ProcessRuntime(
        workdir / "emulator",
        seed_volume=lambda volume: shutil.copytree(seed, volume, dirs_exist_ok=True),
        extra_env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
        volume_buckets=start_s3_api(),
    )
    api_key = "demo-" + secrets.token_hex(16)  # the emulator accepts only this key; never printed
    api = RunpodApi(api_key=api_key, runtime=runtime)
    with serve(api) as base_url:
        runtime.base_url = base_url
        os.environ.update({
            "RUNPOD_API_BASE_URL": base_url,
            "RUNPOD_API_KEY": api_key,
            ENV_VOLUME_MOUNTS: str(runtime.root / "volumes"),
        })
        print(f"[2/4] RunPod emulator on {base_url}", flush=True)
        driver = StackDriver(STACK, workdir / "state", secrets={"runpodApiKey": api_key},
                             overrides=train_override(dataset))
        if shutil.which("pulumi"):
            # The CLI path (a local file backend) is not wired: it could not be run where this was built.
            print("      (the Pulumi CLI is installed; the demo still drives the program through its offline "
                  "engine, emulator/language_host.py)", flush=True)
        print(f"[3/4] up of stack demo (wait: true): volume, dataset upload from {dataset}, pod, training ...",
              flush=True)
        try:
            outputs, operations = driver.up()
            run = outputs.get("run") or {}
            pod_id = outputs["podId"]
            runtime.wait_until_stopped(pod_id, timeout=60)
            bill = runtime.bill(pod_id)
            ratio, trained_seconds = overhead_ratio(bill)
            print("", flush=True)
            print(f"  run         {outputs['runId']}: {run.get('state')} ({run.get('message')})")
            print(f"  LoRA        {run.get('lora')}")
            # numbers come back through Pulumi's outputs as protobuf doubles (4 arrives as 4.0)
            steps = "/".join(f"{value:g}" if isinstance(value, float) else str(value)
                             for value in (run.get("step"), run.get("total")))
            print(f"  steps       {steps}, final loss {run.get('loss')}")
            print(f"  billed      {bill.closed_seconds} s on {bill.gpu_id} at ${bill.usd_per_hour:.2f}/h = "
                  f"${bill.cost_usd(time.monotonic()):.4f} (emulated; the pod stopped itself)")
            print(f"  overhead    {ratio:.3f} (billed {bill.closed_seconds} s / trainer ran {trained_seconds:.1f} s; "
                  f"must stay below {MAX_OVERHEAD_RATIO})")
            print(f"  resources   {dict(operations.counts)}", flush=True)
        finally:
            _save_pod_logs(api, workdir / "pod-logs.txt")
            print("[4/4] destroy of stack demo (offline stand-in, no Pulumi CLI) ...", flush=True)
            destroyed = driver.destroy()
            runtime.shutdown()
        left = {"pods": list(api.pods), "volumes": list(api.volumes), "billing": runtime.billing_pods()}
        print(f"  destroyed   {dict(destroyed.counts)}; left: {left}")
    problems = []
    if run.get("state") != "succeeded" or not run.get("lora"):
        problems.append("the run did not succeed with a downloaded LoRA")
    if not run.get("report"):
        problems.append("no report was rendered")
    if ratio >= MAX_OVERHEAD_RATIO:
        problems.append(f"overhead ratio {ratio:.3f} is not below {MAX_OVERHEAD_RATIO}")
    if any(left.values()):
        problems.append(f"something is left after destroy: {left}")
    elapsed = time.monotonic() - started
    if problems:
        print("DEMO FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"demo done in {elapsed:.0f} s: nothing is running, nothing is billing. The LoRA is in {run['lora']}")
    print(f"report: {run.get('report')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
