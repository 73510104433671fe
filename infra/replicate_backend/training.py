"""Training: one Replicate training (a pinned trainer version, trained into the destination model).

A training cannot be changed, only run again: a changed destination, trainer, trainer version, input or dataset
content replaces it (the old one is canceled first if it still runs; the versions it made stay in the model).
Rotating the Hugging Face or W&B token does not retrain.

The dataset. A local folder is zipped deterministically (sorted names, fixed timestamps and modes, captions
renamed to the trainer's `.txt`), so the same images and captions give the same bytes and the same sha256:
`check` records that hash (a changed image or caption is a changed input), and `create` uploads the zip
through the files API only if no unexpired file with that hash is there already. An https URL of a .zip is
passed to the trainer as it is.

Waiting. With `wait`, `create` follows the training to its end, prints a progress line to stderr whenever
it changes (the engine shows a provider's stderr only with `pulumi up -v=...`/`--logtostderr`; the
trainingUrl output is the reliable place to watch), cancels it past `maxSeconds` or when its GPU time would
cost more than `maxCostUsd`, and fails `pulumi up` with the trainer's error and last log lines if it does
not succeed. Without `wait` it returns once the training started; `pulumi up --refresh` reads its outcome.
Replicate's `aborted` status (ended before it ran) is handled like `failed`.

Secrets (hfToken, wandbApiKey) are inputs only: they go into the trainer's input and never into the outputs;
the API echoes a training's input, so no training JSON is ever copied into the state.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, DiffResult, ReadResult, UpdateResult
from replicate.exceptions import ReplicateError

from contract.dataset import folder_content_hash
from contract.redaction import redacted_source
from contract.spec import TrainSpec
from infra.dynamic import changed_keys, is_unknown, whole_numbers
from infra.replicate_backend.client import ReplicateClient
from infra.replicate_backend.provider import ReplicateProvider, plain_inputs

DEFAULT_TRAINER = "ostris/flux-dev-lora-trainer"
RUNNING = ("starting", "processing")
SUCCEEDED = "succeeded"
# secret inputs -> the trainer's input names
SECRET_INPUTS = {"hfToken": "hf_token", "wandbApiKey": "wandb_api_key"}
TRAINING_REPLACE_KEYS = ("destination", "trainer", "trainerInput", "datasetFingerprint")
TRAINING_OUTPUT_KEYS = ("trainingId", "status", "version", "versionRef", "weights", "error", "trainingUrl")
TRAINING_STATE_KEYS = ("wait", "maxSeconds", "maxCostUsd", "usdPerSecond", "datasetSource")  # no API call needed
# the trainer's integer inputs: Pulumi hands a provider every number as a float (1000 arrives as 1000.0), and
# the trainer's input schema refuses 1000.0 for an integer
INTEGER_INPUTS = ("steps", "lora_rank", "batch_size", "wandb_sample_interval", "wandb_save_interval")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # the files API's limit
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no clock in the bytes


class DatasetError(ValueError):
    pass


def trainer_input(spec: TrainSpec, autocaption: bool) -> dict[str, Any]:
    """The FLUX LoRA trainer's non-secret inputs from the TrainSpec (input_images and tokens are added at create)."""
    mapped: dict[str, Any] = {
        "steps": spec.steps,
        "lora_rank": spec.rank,
        "learning_rate": spec.learning_rate,
        "batch_size": spec.batch_size,
        "resolution": str(spec.resolution),  # the trainer takes a comma-separated list of sizes
        "autocaption": autocaption,
    }
    if spec.trigger_word:
        mapped["trigger_word"] = spec.trigger_word
    if spec.hf_repo:
        mapped["hf_repo_id"] = spec.hf_repo
    if spec.wandb_project:
        mapped["wandb_project"] = spec.wandb_project
    return mapped


def is_url(source: str) -> bool:
    return source.startswith(("https://", "http://"))


def dataset_zip(folder: Path, caption_extension: str = ".txt", default_caption: str = "") -> bytes:
    """The images under `folder` with their captions as `<image stem>.txt`, in a byte-for-byte repeatable zip."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder of images")
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DatasetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:

        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # the same bytes from any OS
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)

        for image in images:
            relative = image.relative_to(folder).as_posix()
            add(relative, image.read_bytes())
            caption = image.with_suffix(caption_extension)
            text = caption.read_bytes() if caption.is_file() else default_caption.encode()
            if text:
                add(relative[: -len(image.suffix)] + ".txt", text)
    return buffer.getvalue()


def dataset_fingerprint(source: str, caption_extension: str = ".txt", default_caption: str = "") -> str:
    """What identifies the training's images: the dataset content hash (contract.dataset) for a folder, the URL for a URL."""
    if is_url(source):
        return source
    return "sha256:" + folder_content_hash(Path(source), caption_extension, default_caption)


class TrainingProvider(ReplicateProvider):
    """Inputs: destination, trainer, trainerVersion (None: the trainer's latest at create), trainerInput,
    datasetSource, captionExtension, defaultCaption, hfToken/wandbApiKey (secret), wait, maxSeconds,
    maxCostUsd, usdPerSecond. `check` adds datasetFingerprint. Outputs add trainingId, status, trainerVersion
    (resolved), imagesUrl, version (the new version's id), versionRef (owner/name:id), weights, error,
    trainingUrl."""

    def __init__(self, poll_seconds: float = 15.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.poll_seconds = poll_seconds

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        source = news.get("datasetSource")
        trainer_inputs = news.get("trainerInput") or {}
        if not is_unknown(news.get("destination")) and "/" not in str(news.get("destination")):
            failures.append(CheckFailure("destination", "the destination model as owner/name"))
        if not is_unknown(trainer_inputs):
            for key in SECRET_INPUTS.values():
                if key in trainer_inputs:
                    failures.append(
                        CheckFailure("trainerInput", f"{key} is a secret: pass it as a secret input, not in trainerInput")
                    )
        if not isinstance(source, str) or not source:
            failures.append(
                CheckFailure("datasetSource", "a local folder of images with .txt captions, or an https URL of a .zip")
            )
        elif is_url(source):
            if not source.split("?", 1)[0].lower().endswith(".zip"):
                failures.append(CheckFailure(
                    "datasetSource", f"{redacted_source(source)}: the Replicate trainer takes a .zip of images and .txt "
                    "captions; point dataset.source at a .zip or at a local folder (it is zipped and uploaded)"
                ))
            else:
                # without its credentials: a re-signed URL of the same file is the same training, not a new one
                news = {**news, "datasetFingerprint": redacted_source(source)}
        else:
            try:
                archive = dataset_zip(Path(source), news.get("captionExtension") or ".txt", news.get("defaultCaption") or "")
            except DatasetError as error:
                failures.append(
                    CheckFailure("datasetSource", f"{error} (Hugging Face dataset ids are not supported on Replicate)")
                )
            else:
                if len(archive) > MAX_UPLOAD_BYTES:
                    failures.append(CheckFailure(
                        "datasetSource", f"the zipped dataset is {len(archive) / 2**20:.0f} MB; Replicate's files API takes "
                        "up to 100 MB: host the zip at an https URL and set dataset.source to it"
                    ))
                news = {**news, "datasetFingerprint": "sha256:" + hashlib.sha256(archive).hexdigest()}
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = changed_keys(olds, news, TRAINING_REPLACE_KEYS)
        if news.get("trainerVersion") and news["trainerVersion"] != olds.get("trainerVersion"):
            replaces.append("trainerVersion")  # pinned to another version; an unpinned one never retrains by itself
        updates = changed_keys(olds, news, TRAINING_STATE_KEYS)
        # the old training is canceled before a new one starts: never two billed at once
        return DiffResult(changes=bool(replaces or updates), replaces=replaces, delete_before_replace=bool(replaces))

    def create(self, props: dict[str, Any]) -> CreateResult:
        client = self.client()
        trainer = props.get("trainer") or DEFAULT_TRAINER
        trainer_version = props.get("trainerVersion") or _latest_version(client, trainer)
        images_url = self._images_url(client, props)
        training_input = {**whole_numbers(props.get("trainerInput") or {}, INTEGER_INPUTS), "input_images": images_url}
        for key, name in SECRET_INPUTS.items():
            if props.get(key):
                training_input[name] = props[key]
        training = client.create_training(trainer, trainer_version, props["destination"], training_input)
        # imagesUrl is kept in the state: a dataset URL's credentials are not
        resolved = {**props, "trainer": trainer, "trainerVersion": trainer_version, "imagesUrl": redacted_source(images_url)}
        if props.get("wait"):
            try:
                training = self._follow(client, training, props)
            except Exception:
                # a failed create leaves no state behind: a training left running would be billed unseen
                _cancel_quietly(client, training["id"])
                raise
            if training["status"] != SUCCEEDED:
                raise RuntimeError(_failure_message(training))
        return CreateResult(training["id"], _outputs(resolved, training))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        try:
            training = self.client().get_training(id_)
        except ReplicateError as error:
            if error.status == 404:
                return ReadResult("", {})
            raise
        return ReadResult(id_, _outputs(props, training))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # only state-kept settings changed (diff replaces for everything else): keep what the training reported
        kept = {key: olds.get(key) for key in ("trainerVersion", "imagesUrl", *TRAINING_OUTPUT_KEYS)}
        return UpdateResult({**plain_inputs(news, tuple(SECRET_INPUTS)), **kept})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        client = self.client()
        try:
            if client.get_training(id_)["status"] in RUNNING:
                client.cancel_training(id_)
        except ReplicateError as error:
            if error.status != 404:
                raise

    def _images_url(self, client: ReplicateClient, props: dict[str, Any]) -> str:
        source = props["datasetSource"]
        if is_url(source):
            return source
        archive = dataset_zip(Path(source), props.get("captionExtension") or ".txt", props.get("defaultCaption") or "")
        sha256 = hashlib.sha256(archive).hexdigest()

        def uploaded() -> str | None:
            file = client.find_file(sha256)
            return file["urls"]["get"] if file else None

        def upload() -> str:
            return client.sdk_once.files.create(
                io.BytesIO(archive), filename=f"dataset-{sha256[:12]}.zip", content_type="application/zip",
                metadata={"lorastack": "dataset", "sha256": sha256},
            ).urls["get"]

        return uploaded() or client.create_once(upload, uploaded)

    def _follow(self, client: ReplicateClient, training: dict, props: dict[str, Any]) -> dict:
        """Poll until the training ends; cancel it at the time or money limit."""
        started = time.monotonic()
        max_seconds = props.get("maxSeconds")
        max_cost, usd_per_second = props.get("maxCostUsd"), props.get("usdPerSecond") or 0.0
        last_line = ""
        while training["status"] in RUNNING:
            elapsed = time.monotonic() - started
            cost = elapsed * usd_per_second
            line = f"[replicate] training {training['id']}: {training['status']}, {_last_log_line(training)}, " \
                   f"{elapsed / 60:.0f} min, ~${cost:.2f}"
            if line != last_line:
                print(line, file=sys.stderr, flush=True)
                last_line = line
            over = None
            if max_seconds and elapsed > max_seconds:
                over = f"ran past its time limit ({max_seconds / 3600:.2f} h)"
            elif max_cost and cost > max_cost:
                over = f"would cost more than its limit (${max_cost:g})"
            if over:
                raise RuntimeError(  # create() cancels it
                    f"training {training['id']} {over}; it is canceled. Raise limits.maxHours/maxCostUsd in the "
                    "stack to give it more, then `pulumi up`"
                )
            time.sleep(self.poll_seconds)
            training = client.get_training(training["id"])
        print(f"[replicate] training {training['id']}: {training['status']}", file=sys.stderr, flush=True)
        return training


def _cancel_quietly(client: ReplicateClient, training_id: str) -> None:
    try:
        client.cancel_training(training_id)
    except Exception as error:  # the caller re-raises the first error; this one is reported
        print(f"[replicate] could not cancel training {training_id} ({error}): cancel it at "
              f"https://replicate.com/p/{training_id}", file=sys.stderr, flush=True)


def _latest_version(client: ReplicateClient, trainer: str) -> str:
    latest = client.sdk.models.get(trainer).latest_version
    if latest is None:
        raise RuntimeError(f"the trainer {trainer} has no version on Replicate; pin replicate.trainerVersion")
    return latest.id


def _last_log_line(training: dict) -> str:
    lines = [line for line in (training.get("logs") or "").splitlines() if line.strip()]
    return lines[-1].strip()[:120] if lines else "no logs yet"


def _failure_message(training: dict) -> str:
    status = training["status"]
    why = {
        "aborted": "was aborted before it started running (Replicate ends a training that cannot start in time)",
        "canceled": "was canceled (by its creator, or at its deadline)",
    }.get(status, f"ended {status}")
    tail = "\n".join((training.get("logs") or "").rstrip().splitlines()[-10:])
    lines = [f"training {training['id']} {why}: https://replicate.com/p/{training['id']}"]
    if training.get("error"):
        lines.append(f"error: {training['error']}")
    if tail:
        lines.append("last log lines:\n" + tail)
    lines.append("fix the cause, then `pulumi up` starts a new training")
    return "\n".join(lines)


def _outputs(props: dict[str, Any], training: dict) -> dict[str, Any]:
    raw_output = training.get("output")
    output: dict[str, Any] = raw_output if isinstance(raw_output, dict) else {}
    version_ref = output.get("version")
    return {
        **plain_inputs(props, tuple(SECRET_INPUTS)),
        "trainingId": training["id"],
        "status": training["status"],
        "version": version_ref.rsplit(":", 1)[1] if version_ref else None,
        "versionRef": version_ref,
        "weights": output.get("weights"),
        "error": training.get("error"),
        "trainingUrl": f"https://replicate.com/p/{training['id']}",
    }


@dataclass
class TrainingArgs:
    destination: pulumi.Input[str]  # owner/name of the model that receives the new version
    trainer_input: dict[str, Any]
    dataset_source: str  # a local folder (absolute) or an https URL of a .zip (its credentials are kept secret)
    trainer: str = DEFAULT_TRAINER
    trainer_version: str | None = None
    caption_extension: str = ".txt"
    default_caption: str = ""
    hf_token: pulumi.Input[str] | None = None  # secret Outputs
    wandb_api_key: pulumi.Input[str] | None = None
    wait: bool = False
    max_seconds: float | None = None
    max_cost_usd: float | None = None
    usd_per_second: float = 0.0


class Training(pulumi.dynamic.Resource, module="replicate", name="Training"):
    trainingId: pulumi.Output[str]
    status: pulumi.Output[str]
    trainerVersion: pulumi.Output[str]
    version: pulumi.Output[str | None]
    versionRef: pulumi.Output[str | None]
    weights: pulumi.Output[str | None]
    trainingUrl: pulumi.Output[str]

    def __init__(self, resource_name: str, args: TrainingArgs, opts: pulumi.ResourceOptions | None = None):
        # a signed or user:password URL is stored encrypted in the state, as the stack's other secrets
        carries_credentials = redacted_source(args.dataset_source) != args.dataset_source
        props = {
            "destination": args.destination,
            "trainer": args.trainer,
            "trainerVersion": args.trainer_version,
            "trainerInput": args.trainer_input,
            "datasetSource": pulumi.Output.secret(args.dataset_source) if carries_credentials else args.dataset_source,
            "captionExtension": args.caption_extension,
            "defaultCaption": args.default_caption,
            "hfToken": args.hf_token,
            "wandbApiKey": args.wandb_api_key,
            "wait": args.wait,
            "maxSeconds": args.max_seconds,
            "maxCostUsd": args.max_cost_usd,
            "usdPerSecond": args.usd_per_second,
            "datasetFingerprint": None,
            "imagesUrl": None,
            **dict.fromkeys(TRAINING_OUTPUT_KEYS),
        }
        # the provider host gets secrets as plain values: what it returns under these keys is marked secret again
        secret_outputs = [*SECRET_INPUTS, *(["datasetSource"] if carries_credentials else [])]
        fixed = pulumi.ResourceOptions(additional_secret_outputs=secret_outputs)
        super().__init__(TrainingProvider(), resource_name, props, pulumi.ResourceOptions.merge(opts, fixed))
