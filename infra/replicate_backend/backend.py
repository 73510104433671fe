"""Replicate as a lorastack backend: a destination model, a training by a Replicate trainer, an optional deployment
(infra.backends.Backend). The trainer is Replicate's model, not our image, so the memory fit rule is not ours to run."""

from __future__ import annotations

import shutil
import sys
import tarfile
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import requests

from infra.backends import LivePrices, OpsError, ReapDecision, Report, short_error
from infra.credentials import SECRETS
from infra.replicate_backend.catalog import REPLICATE_HARDWARE_USD_PER_SECOND, REPLICATE_PRICES_SOURCE, REPLICATE_SKU_GPU
from infra.replicate_backend.config import ReplicateConfig

if TYPE_CHECKING:
    from infra.config import StackConfig

DEFAULT_BASE_URL = "https://api.replicate.com"
FLUX_ONLY_TRAINER = "ostris/flux-dev-lora-trainer"


def _section(config: StackConfig) -> ReplicateConfig:
    """The stack's `lorastack:replicate` section: StackConfig refuses a replicate stack without one, and this backend is
    only asked about its own stacks."""
    return cast(ReplicateConfig, config.replicate)  # never None here (StackConfig's _backend check)


class ReplicateBackend:
    name = "replicate"
    section = ReplicateConfig
    ops_secrets = ("replicateApiToken",)
    ops_optional_secrets = ()

    def check(self, config: StackConfig) -> None:
        trainer = _section(config).trainer
        if config.train.family != "flux" and trainer == FLUX_ONLY_TRAINER:
            raise ValueError(
                f"train.family is {config.train.family} but the Replicate trainer {trainer} "
                "trains FLUX only; set replicate.trainer to a trainer for that family"
            )

    def gpu_memory(self, config: StackConfig) -> None:
        return None  # Replicate's trainer manages its own memory

    def usd_per_hour(self, config: StackConfig, live: Any = None) -> tuple[float, str]:
        # GET /v1/hardware lists SKUs but no prices: the dated table is the only price there is
        return REPLICATE_HARDWARE_USD_PER_SECOND[_section(config).training_hardware] * 3600, REPLICATE_PRICES_SOURCE

    def performance_gpu(self, config: StackConfig) -> tuple[str, int]:
        return REPLICATE_SKU_GPU[_section(config).training_hardware], 1

    def hardware(self, config: StackConfig) -> str:
        return _section(config).training_hardware

    def cost_notes(self, stack: str, config: StackConfig) -> list[str]:
        return []

    def live_prices(self, environ: Mapping[str, str], timeout: float) -> LivePrices:
        """GET /v1/hardware: the set of SKUs Replicate offers now."""
        token = environ.get(SECRETS["replicateApiToken"])
        if not token:
            return LivePrices(None, "Replicate: the dated table; REPLICATE_API_TOKEN is not set, so the SKU was not "
                                    "checked against Replicate's hardware list")
        base = environ.get("REPLICATE_BASE_URL", DEFAULT_BASE_URL).rstrip("/").removesuffix("/v1")
        try:
            response = requests.get(f"{base}/v1/hardware", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
            response.raise_for_status()
            skus = {item["sku"] for item in response.json()}
        except (requests.RequestException, KeyError, TypeError, ValueError) as error:
            return LivePrices(None, f"Replicate: the dated table; GET /v1/hardware did not answer usefully "
                                    f"({short_error(error)})")
        fetched_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return LivePrices(skus, f"Replicate: the dated table (GET /v1/hardware lists no prices); SKUs checked against "
                                f"it at {fetched_at}")

    def live_warnings(self, config: StackConfig, live: set[str] | None) -> list[str]:
        if live is None:
            return []
        return [f"Replicate no longer lists hardware {sku!r} (GET /v1/hardware); pick another SKU"
                for sku in {_section(config).hardware, _section(config).training_hardware} if sku not in live]

    def build(self, stack: str, config: StackConfig, secrets: Mapping[str, Any],
              image_ref: Callable[[], Any]) -> dict[str, Any]:
        # Replicate's trainer runs, not our image: image_ref is not asked for (nothing is built)
        from infra.replicate_backend.component import ReplicateTraining, ReplicateTrainingArgs

        return dict(ReplicateTraining(stack, ReplicateTrainingArgs(stack=stack, config=config, secrets=secrets)).exports)

    def status(self, stack: str, config: StackConfig, environ: Mapping[str, str]) -> Report:
        raise OpsError(_pointer(config, "status"))

    def logs(self, stack: str, config: StackConfig, environ: Mapping[str, str], emit: Callable[[str], None]) -> Report:
        raise OpsError(_pointer(config, "logs"))

    def fetch(self, stack: str, config: StackConfig, destination: Path, environ: Mapping[str, str]) -> Report:
        """The weights of the destination model's newest training, as Replicate returns them, and a report of
        what there is to show (Replicate's trainer keeps no samples or loss history of ours)."""
        replicate = _section(config)
        model = f"{replicate.owner}/{replicate.model}"
        token = environ.get(SECRETS["replicateApiToken"])
        if not token:
            raise OpsError(f"REPLICATE_API_TOKEN is not set: export it to download the weights of the newest "
                           f"training of https://replicate.com/{model}")
        from replicate.exceptions import ReplicateError  # the replicate SDK: only when asked

        from infra.replicate_backend.client import ReplicateClient

        try:
            training = newest_training(ReplicateClient(token, environ.get("REPLICATE_BASE_URL")), model)
        except ReplicateError as error:
            raise OpsError(f"Replicate answered {error} (check REPLICATE_API_TOKEN, and REPLICATE_BASE_URL if set)") from None
        if training is None:
            raise OpsError(f"no training of https://replicate.com/{model} yet: make train STACK={stack}")
        page = f"https://replicate.com/p/{training['id']}"
        weights = (training.get("output") or {}).get("weights") if isinstance(training.get("output"), dict) else None
        if training.get("status") != "succeeded" or not weights:
            raise OpsError(f"the newest training of {model}, {page}, is {training.get('status')}: no weights to fetch")
        print(f"downloading the weights of training {training['id']} into {destination} ...", file=sys.stderr, flush=True)
        try:
            written = download_weights(weights, destination)
        except (requests.RequestException, tarfile.TarError, OSError) as error:
            raise OpsError(f"downloading {weights} failed ({short_error(error)}); the weights are also on {page}") from None
        from report import RunFacts, render_report  # Pillow, matplotlib, Jinja2: only once there is a run to show

        seconds = (training.get("metrics") or {}).get("predict_time")
        usd_per_second = REPLICATE_HARDWARE_USD_PER_SECOND[replicate.training_hardware]
        facts = RunFacts.from_spec(
            config.train, stack=stack, backend="replicate", gpu=replicate.training_hardware, run_id=training["id"],
            state=training["status"], wall_seconds=seconds, cost_usd=seconds * usd_per_second if seconds else None,
        )
        report = render_report(destination, facts)
        return Report([f"{stack}: {', '.join(path.name for path in written)} from {page} in {destination}",
                       f"report: {report}"])

    def reap(self, live_stacks: set[str], environ: Mapping[str, str], *, dry_run: bool,
             grace_minutes: float) -> list[ReapDecision]:
        # Nothing of ours bills by the hour unwatched: a training ends at its own limits (the Training provider
        # cancels it at the money limit) and a deployment scales to zero unless the stack pays for warm instances.
        return []


def newest_training(client, model: str, pages: int = 20) -> dict | None:
    """The newest training whose destination is `model` (GET /v1/trainings lists newest first, a page at a time)."""
    path: str | None = "/v1/trainings"
    for _ in range(pages):
        if path is None:
            return None
        page = client.json("GET", path)
        for training in page.get("results", []):
            if training.get("destination") == model:
                return training
        following = urlsplit(page.get("next") or "")
        path = f"{following.path}?{following.query}" if following.path else None
    return None


def download_weights(url: str, destination: Path) -> list[Path]:
    """The weights file at `url` into `destination`; a .tar (what Replicate's LoRA trainers return) gives up its
    .safetensors files, each by its own name. Each file is written to a temporary name, then renamed."""
    destination.mkdir(parents=True, exist_ok=True)
    name = Path(urlsplit(url).path).name or "weights"
    archive = destination / f".{name}.download"
    try:
        with requests.get(url, stream=True, timeout=60) as response:  # no token: the URL is signed
            response.raise_for_status()
            with archive.open("wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
        if not tarfile.is_tarfile(archive):
            target = destination / name
            archive.replace(target)
            return [target]
        written = []
        with tarfile.open(archive) as bundle:
            for member in bundle.getmembers():
                if not (member.isfile() and member.name.endswith(".safetensors")):
                    continue
                target = destination / Path(member.name).name  # flattened: no path from the archive is used
                partial = destination / f".{target.name}.part"
                member_file = cast(IO[bytes], bundle.extractfile(member))  # a regular file (isfile above): never None
                with member_file as source, partial.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                partial.replace(target)
                written.append(target)
        if not written:
            raise tarfile.TarError(f"{name} holds no .safetensors file")
        return written
    finally:
        archive.unlink(missing_ok=True)


def _pointer(config: StackConfig, command: str) -> str:
    replicate = _section(config)
    return (f"`make {command}` follows RunPod pods; this stack trains on Replicate: see "
            f"https://replicate.com/{replicate.owner}/{replicate.model} (its trainings and versions), or "
            "`pulumi stack output --stack <stack>` for the training id")


BACKEND = ReplicateBackend()
