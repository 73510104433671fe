"""A local Replicate HTTP API: the paths lorastack uses, in the shapes of shared/reference/replicate-openapi.yaml.

Models (with Replicate's delete rules), versions, trainings (starting -> processing -> a terminal status, on a
clock the tests control; success adds a version to the destination model), deployments (validated, and
deletable only after 15 minutes offline), files (multipart upload) and the hardware list. Every request needs
`Authorization: Bearer <token>` (or `Token <token>`).

    python -m emulator.replicate --port 8788     # then REPLICATE_BASE_URL=http://127.0.0.1:8788
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from emulator.server import ApiError, JsonApi, Request, Response, serve
from infra.replicate_backend import catalog

TRAINER = "ostris/flux-dev-lora-trainer"
TRAINER_VERSION = hashlib.sha256(b"emulator:ostris/flux-dev-lora-trainer:1").hexdigest()
DEFAULT_TOKEN = "r8_emulator_token"
DEFAULT_ACCOUNT = "lorastack"
DEPLOYMENT_OFFLINE_SECONDS = 15 * 60
MAX_FILE_BYTES = 100 * 1024 * 1024
FILE_LIFETIME_SECONDS = 24 * 3600
OUTCOMES = ("succeeded", "failed", "canceled", "aborted")
TERMINAL = ("succeeded", "failed", "canceled", "aborted")
HARDWARE_NAMES = {
    "cpu": "CPU", "gpu-t4": "Nvidia T4 GPU", "gpu-a40-large": "Nvidia A40 (Large) GPU",
    "gpu-l40s": "Nvidia L40S GPU", "gpu-a100-large": "Nvidia A100 (80GB) GPU", "gpu-h100": "Nvidia H100 GPU",
}
# The FLUX trainer's inputs (replicate/flux-fine-tuner): what the emulator accepts, like the real input schema.
TRAINER_INPUTS: dict[str, str] = {
    "input_images": "string", "trigger_word": "string", "autocaption": "boolean", "autocaption_prefix": "string",
    "autocaption_suffix": "string", "steps": "integer", "lora_rank": "integer", "optimizer": "string",
    "batch_size": "integer", "resolution": "string", "learning_rate": "number", "caption_dropout_rate": "number",
    "cache_latents_to_disk": "boolean", "wandb_api_key": "string", "wandb_project": "string",
    "wandb_run": "string", "wandb_entity": "string", "wandb_sample_interval": "integer",
    "wandb_sample_prompts": "string", "wandb_save_interval": "integer", "hf_repo_id": "string", "hf_token": "string",
    "gradient_checkpointing": "boolean", "layers_to_optimize_regex": "string",
}
_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "number": (int, float), "boolean": bool}
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")


class FakeClock:
    """A clock tests move by hand: `clock.advance(901)` and a deployment has been offline 15 minutes."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Model:
    owner: str
    name: str
    visibility: str
    hardware: str
    description: str | None
    created_at: float
    versions: list[dict] = field(default_factory=list)  # newest first, as the API lists them
    extra: dict = field(default_factory=dict)  # github_url, paper_url, license_url, cover_image_url

    def as_json(self) -> dict:
        return {
            "url": f"https://replicate.com/{self.owner}/{self.name}",
            "owner": self.owner,
            "name": self.name,
            "description": self.description,
            "visibility": self.visibility,
            "github_url": self.extra.get("github_url"),
            "paper_url": self.extra.get("paper_url"),
            "license_url": self.extra.get("license_url"),
            "cover_image_url": self.extra.get("cover_image_url"),
            "run_count": 0,
            "default_example": None,
            "is_official": False,
            "latest_version": self.versions[0] if self.versions else None,
        }


@dataclass
class _Training:
    id: str
    model: str
    version: str
    destination: str
    input: dict
    webhook: str | None
    outcome: str
    created_at: float
    status: str = "starting"
    started_at: float | None = None
    completed_at: float | None = None
    output: dict | None = None
    error: str | None = None
    logs: str = ""


@dataclass
class _Deployment:
    owner: str
    name: str
    model: str
    version: str
    hardware: str
    min_instances: int
    max_instances: int
    release: int
    released_at: float
    offline_since: float | None  # None while instances are kept running

    def as_json(self) -> dict:
        return {
            "owner": self.owner,
            "name": self.name,
            "current_release": {
                "number": self.release,
                "model": self.model,
                "version": self.version,
                "created_at": _iso(self.released_at),
                "created_by": {"type": "user", "username": self.owner, "name": self.owner, "github_url": None},
                "configuration": {
                    "hardware": self.hardware,
                    "min_instances": self.min_instances,
                    "max_instances": self.max_instances,
                },
            },
        }


class ReplicateApi(JsonApi):
    """The emulated API. `start_seconds`/`run_seconds` time a training's phases on `clock`; `outcome` (or
    `plan_outcome()` for the next training) decides how it ends."""

    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = (DEFAULT_TOKEN,),
        account: str = DEFAULT_ACCOUNT,
        clock: Callable[[], float] = time.time,
        start_seconds: float = 2.0,
        run_seconds: float = 10.0,
        outcome: str = "succeeded",
    ):
        super().__init__()
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        self.tokens = set(tokens)
        self.account = account
        self.clock = clock
        self.start_seconds = start_seconds
        self.run_seconds = run_seconds
        self.outcome = outcome
        self._ids = itertools.count(1)
        self.reset()
        for method, path, handler in (
            ("GET", "/v1/account", self.get_account),
            ("GET", "/v1/hardware", self.list_hardware),
            ("POST", "/v1/models", self.create_model),
            ("GET", "/v1/models/{owner}/{name}", self.get_model),
            ("PATCH", "/v1/models/{owner}/{name}", self.update_model),
            ("DELETE", "/v1/models/{owner}/{name}", self.delete_model),
            ("GET", "/v1/models/{owner}/{name}/versions", self.list_versions),
            ("GET", "/v1/models/{owner}/{name}/versions/{version_id}", self.get_version),
            ("DELETE", "/v1/models/{owner}/{name}/versions/{version_id}", self.delete_version),
            ("POST", "/v1/models/{owner}/{name}/versions/{version_id}/trainings", self.create_training),
            ("GET", "/v1/trainings", self.list_trainings),
            ("GET", "/v1/trainings/{training_id}", self.get_training),
            ("POST", "/v1/trainings/{training_id}/cancel", self.cancel_training),
            ("GET", "/v1/deployments", self.list_deployments),
            ("POST", "/v1/deployments", self.create_deployment),
            ("GET", "/v1/deployments/{owner}/{name}", self.get_deployment),
            ("PATCH", "/v1/deployments/{owner}/{name}", self.update_deployment),
            ("DELETE", "/v1/deployments/{owner}/{name}", self.delete_deployment),
            ("GET", "/v1/files", self.list_files),
            ("POST", "/v1/files", self.create_file),
            ("GET", "/v1/files/{file_id}", self.get_file),
            ("DELETE", "/v1/files/{file_id}", self.delete_file),
        ):
            self.route(method, path, handler)

    # ------------------------------------------------------------------------------------------ plumbing

    def reset(self) -> None:
        """Back to a fresh account holding only the seeded trainer (tests share one server)."""
        with self.lock:
            self._planned: list[str] = []
            self._faults.clear()
            self.requests.clear()
            self.models: dict[str, _Model] = {}
            self.trainings: dict[str, _Training] = {}
            self.deployments: dict[str, _Deployment] = {}
            self.files: dict[str, dict] = {}
            self._file_content: dict[str, bytes] = {}
            self._seed_trainer()

    def settle(self) -> None:
        """Bring every training up to the clock: they move on whether or not anyone polls them."""
        with self.lock:
            for training in self.trainings.values():
                self._advance(training)

    def dispatch(self, request: Request) -> Response:
        self.settle()
        return super().dispatch(request)

    def error_body(self, status: int, detail: str, errors: list[str]) -> object:
        titles = {400: "Bad Request", 401: "Unauthenticated", 404: "Not found", 409: "Conflict",
                  413: "Content Too Large", 422: "Input validation failed", 429: "Too Many Requests",
                  500: "Internal Server Error", 503: "Service Unavailable"}
        body: dict[str, object] = {"title": titles.get(status, "Error"), "status": status, "detail": detail}
        if errors:
            body["invalid_fields"] = errors
        return body

    def authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme not in ("Bearer", "Token") or token.strip() not in self.tokens:
            raise ApiError(401, "You did not pass a valid authentication token")

    def plan_outcome(self, outcome: str) -> None:
        """The next training created ends this way (then trainings go back to `self.outcome`)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        with self.lock:
            self._planned.append(outcome)

    def _new_id(self, kind: str) -> str:
        # Replicate ids are 26 lowercase base32 characters
        digest = hashlib.sha256(f"{kind}:{next(self._ids)}:{id(self)}".encode()).digest()
        return "".join("abcdefghijklmnopqrstuvwxyz234567"[b % 32] for b in digest[:26])

    def _seed_trainer(self) -> None:
        trainer_owner, trainer_name = TRAINER.split("/")
        model = _Model(trainer_owner, trainer_name, "public", "gpu-h100",
                       "Fine-tune FLUX.1-dev using ai-toolkit", self.clock())
        model.versions.append(self._version_json(TRAINER_VERSION, self.clock(), trainer=True))
        self.models[TRAINER] = model

    def _version_json(self, version_id: str, created: float, trainer: bool = False) -> dict:
        schemas: dict[str, object] = {
            "Input": {"type": "object", "title": "Input", "required": ["prompt"],
                      "properties": {"prompt": {"type": "string"}, "lora_scale": {"type": "number"}}},
        }
        if trainer:
            schemas["TrainingInput"] = {
                "type": "object", "title": "TrainingInput", "required": ["input_images"],
                "properties": {name: {"type": kind} for name, kind in TRAINER_INPUTS.items()},
            }
        return {"id": version_id, "created_at": _iso(created), "cog_version": "0.13.7",
                "openapi_schema": {"openapi": "3.0.2", "components": {"schemas": schemas}}}

    def _model(self, owner: str, name: str) -> _Model:
        model = self.models.get(f"{owner}/{name}")
        if model is None:
            raise ApiError(404, f"Model {owner}/{name} not found")
        return model

    @staticmethod
    def _body(request: Request) -> dict:
        if not isinstance(request.body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return request.body

    # ----------------------------------------------------------------------------------- account, hardware

    def get_account(self, request: Request) -> dict:
        return {"type": "user", "username": self.account, "name": self.account, "github_url": None}

    def list_hardware(self, request: Request) -> list[dict]:
        skus = ["cpu", *catalog.REPLICATE_HARDWARE_USD_PER_SECOND]
        return [{"name": HARDWARE_NAMES.get(sku, sku), "sku": sku} for sku in skus]

    # ---------------------------------------------------------------------------------- models, versions

    def create_model(self, request: Request) -> Response:
        body = self._body(request)
        missing = [key for key in ("owner", "name", "visibility", "hardware") if key not in body]
        if missing:
            raise ApiError(422, "missing required fields: " + ", ".join(missing), missing)
        if body["visibility"] not in ("public", "private"):
            raise ApiError(422, "visibility must be public or private", ["visibility"])
        if body["hardware"] not in HARDWARE_NAMES and body["hardware"] not in catalog.REPLICATE_HARDWARE_USD_PER_SECOND:
            raise ApiError(422, f"hardware {body['hardware']!r} is not a valid SKU (see GET /v1/hardware)", ["hardware"])
        if not re.match(r"^[a-z0-9][a-z0-9._-]*$", str(body["name"])):
            raise ApiError(422, "name may contain lowercase letters, digits, dashes, underscores and periods", ["name"])
        key = f"{body['owner']}/{body['name']}"
        with self.lock:
            if key in self.models:
                raise ApiError(409, f"A model with the name {key} already exists")
            extra = {k: body[k] for k in ("github_url", "paper_url", "license_url", "cover_image_url") if k in body}
            model = _Model(body["owner"], body["name"], body["visibility"], body["hardware"],
                           body.get("description"), self.clock(), extra=extra)
            self.models[key] = model
            return Response(201, model.as_json())

    def get_model(self, request: Request) -> dict:
        with self.lock:
            return self._model(request.params["owner"], request.params["name"]).as_json()

    def update_model(self, request: Request) -> dict:
        body = self._body(request)
        allowed = ("description", "readme", "github_url", "paper_url", "weights_url", "license_url")
        unknown = [key for key in body if key not in allowed]
        if unknown:
            raise ApiError(422, "these properties cannot be updated: " + ", ".join(unknown), unknown)
        with self.lock:
            model = self._model(request.params["owner"], request.params["name"])
            if "description" in body:
                model.description = body["description"]
            model.extra.update({k: v for k, v in body.items() if k != "description"})
            return model.as_json()

    def delete_model(self, request: Request) -> Response:
        with self.lock:
            model = self._model(request.params["owner"], request.params["name"])
            if model.visibility != "private":
                raise ApiError(400, "Only private models can be deleted")
            if model.versions:
                raise ApiError(400, "Models with versions cannot be deleted; delete the model's versions first")
            del self.models[f"{model.owner}/{model.name}"]
            return Response(204)

    def list_versions(self, request: Request) -> dict:
        with self.lock:
            model = self._model(request.params["owner"], request.params["name"])
            return {"next": None, "previous": None, "results": list(model.versions)}

    def _find_version(self, model: _Model, version_id: str) -> dict:
        version = next((v for v in model.versions if v["id"] == version_id), None)
        if version is None:
            raise ApiError(404, f"Version {version_id} of {model.owner}/{model.name} not found")
        return version

    def get_version(self, request: Request) -> dict:
        with self.lock:
            model = self._model(request.params["owner"], request.params["name"])
            return self._find_version(model, request.params["version_id"])

    def delete_version(self, request: Request) -> Response:
        with self.lock:
            model = self._model(request.params["owner"], request.params["name"])
            version = self._find_version(model, request.params["version_id"])
            if model.visibility != "private":
                raise ApiError(400, "Versions can only be deleted from private models")
            ref = f"{model.owner}/{model.name}"
            if any(d.model == ref and d.version == version["id"] for d in self.deployments.values()):
                raise ApiError(400, "This version has an associated deployment and cannot be deleted")
            model.versions.remove(version)
            return Response(202)  # accepted: the real API deletes asynchronously

    # ------------------------------------------------------------------------------------------ trainings

    def create_training(self, request: Request) -> Response:
        body = self._body(request)
        owner, name, version_id = request.params["owner"], request.params["name"], request.params["version_id"]
        with self.lock:
            base = self._model(owner, name)
            self._find_version(base, version_id)
            destination = body.get("destination")
            if not isinstance(destination, str) or destination not in self.models:
                raise ApiError(404, f"The destination model {destination!r} does not exist; create it first",
                               ["destination"])
            training_input = body.get("input")
            if not isinstance(training_input, dict):
                raise ApiError(422, "input is required and must be an object", ["input"])
            self._validate_trainer_input(training_input)
            webhook = body.get("webhook")
            if webhook is not None and not str(webhook).startswith("https://"):
                raise ApiError(422, "webhook must be an HTTPS URL", ["webhook"])
            outcome = self._planned.pop(0) if self._planned else self.outcome
            training = _Training(
                id=self._new_id("training"), model=f"{owner}/{name}", version=version_id, destination=destination,
                input=dict(training_input), webhook=webhook, outcome=outcome, created_at=self.clock(),
            )
            self.trainings[training.id] = training
            return Response(201, self._training_json(training, request))

    def _validate_trainer_input(self, training_input: dict) -> None:
        problems = []
        if "input_images" not in training_input:
            problems.append("input_images: required")
        for key, value in training_input.items():
            kind = TRAINER_INPUTS.get(key)
            if kind is None:
                problems.append(f"{key}: Additional property {key} is not allowed")
            elif not isinstance(value, _JSON_TYPES[kind]) or (kind != "boolean" and isinstance(value, bool)):
                problems.append(f"{key}: Invalid type. Expected: {kind}")
        if problems:
            raise ApiError(422, "; ".join(problems), problems)

    def _advance(self, training: _Training) -> None:
        """Bring a training's status up to the clock: starting -> processing -> its planned end."""
        if training.status in TERMINAL:
            return
        now = self.clock()
        started = training.created_at + self.start_seconds
        if training.outcome == "aborted":
            if now >= started:  # aborted: ended before it ever ran
                training.status, training.completed_at = "aborted", started
            return
        if now < started:
            return
        training.status, training.started_at = "processing", started
        steps = int(training.input.get("steps", 1000))
        done = min(steps, int(steps * (now - started) / self.run_seconds)) if self.run_seconds else steps
        training.logs = "".join(f"flux_train_replicate: step {step}/{steps}\n"
                                for step in range(0, done + 1, max(1, steps // 10)))
        if now < started + self.run_seconds:
            return
        training.completed_at = started + self.run_seconds
        training.status = training.outcome
        if training.outcome == "succeeded":
            self._publish_version(training)
            training.logs += "Training complete; pushed the new version\n"
        elif training.outcome == "failed":
            training.error = "CUDA out of memory (emulated failure)"
            training.logs += f"Traceback (most recent call last):\n  ...\n{training.error}\n"
        else:
            training.logs += "Training canceled: it reached its deadline\n"

    def _publish_version(self, training: _Training) -> None:
        destination = self.models.get(training.destination)
        if destination is None:  # deleted while training: the real API fails the training
            training.status, training.error = "failed", f"destination {training.destination} no longer exists"
            return
        version_id = hashlib.sha256(f"{training.destination}:{training.id}".encode()).hexdigest()
        completed = cast(float, training.completed_at)  # _advance sets it before it publishes
        destination.versions.insert(0, self._version_json(version_id, completed))
        training.output = {
            "version": f"{training.destination}:{version_id}",
            "weights": f"https://replicate.delivery/emulated/{training.id}/trained_model.tar",
        }

    def _training_json(self, training: _Training, request: Request) -> dict:
        self._advance(training)
        base = f"http://{request.headers.get('host', 'api.replicate.com')}/v1/trainings/{training.id}"
        body = {
            "id": training.id,
            "model": training.model,
            "version": training.version,
            "destination": training.destination,
            "input": training.input,
            "output": training.output,
            "logs": training.logs,
            "error": training.error,
            "status": training.status,
            "source": "api",
            "created_at": _iso(training.created_at),
            "started_at": _iso(training.started_at) if training.started_at else None,
            "completed_at": _iso(training.completed_at) if training.completed_at else None,
            "urls": {"web": f"https://replicate.com/p/{training.id}", "get": base, "cancel": f"{base}/cancel"},
        }
        if training.status in TERMINAL:
            completed = cast(float, training.completed_at)  # set whenever a training reaches a terminal state
            run_time = (completed - training.started_at) if training.started_at else 0.0
            body["metrics"] = {"predict_time": run_time, "total_time": completed - training.created_at}
        return body

    def _training(self, training_id: str) -> _Training:
        training = self.trainings.get(training_id)
        if training is None:
            raise ApiError(404, f"Training {training_id} not found")
        return training

    def get_training(self, request: Request) -> dict:
        with self.lock:
            return self._training_json(self._training(request.params["training_id"]), request)

    def list_trainings(self, request: Request) -> dict:
        with self.lock:
            newest_first = sorted(self.trainings.values(), key=lambda t: t.created_at, reverse=True)
            return {"next": None, "previous": None,
                    "results": [self._training_json(training, request) for training in newest_first]}

    def cancel_training(self, request: Request) -> dict:
        with self.lock:
            training = self._training(request.params["training_id"])
            self._advance(training)
            if training.status not in TERMINAL:  # canceling a finished training changes nothing
                training.status, training.completed_at = "canceled", self.clock()
                training.started_at = training.started_at or training.completed_at
                training.logs += "Training canceled by its creator\n"
            return self._training_json(training, request)

    # ---------------------------------------------------------------------------------------- deployments

    def _validate_release(self, body: dict, model_ref: str) -> None:
        problems = []
        version = body.get("version")
        if "version" in body:
            if not (isinstance(version, str) and _VERSION_ID.match(version)):
                problems.append("version: must be the 64-character id of a model version")
            elif model_ref in self.models and not any(v["id"] == version for v in self.models[model_ref].versions):
                problems.append(f"version: {version} is not a version of {model_ref}")
        if "hardware" in body and body["hardware"] not in catalog.REPLICATE_HARDWARE_USD_PER_SECOND:
            problems.append(f"hardware: {body['hardware']!r} is not a valid SKU (see GET /v1/hardware)")
        for key, maximum in (("min_instances", 5), ("max_instances", 20)):
            value = body.get(key)
            if key in body and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum):
                problems.append(f"{key}: must be an integer from 0 to {maximum}")
        if problems:
            raise ApiError(422, "; ".join(problems), problems)

    def create_deployment(self, request: Request) -> dict:
        body = self._body(request)
        missing = [k for k in ("name", "model", "version", "hardware", "min_instances", "max_instances") if k not in body]
        if missing:
            raise ApiError(422, "missing required fields: " + ", ".join(missing), missing)
        with self.lock:
            if body["model"] not in self.models:
                raise ApiError(404, f"Model {body['model']} not found")
            self._validate_release(body, body["model"])
            if body["min_instances"] > body["max_instances"]:
                raise ApiError(422, "min_instances cannot be greater than max_instances")
            key = f"{self.account}/{body['name']}"
            if key in self.deployments:
                raise ApiError(409, f"A deployment named {body['name']} already exists")
            now = self.clock()
            deployment = _Deployment(
                owner=self.account, name=body["name"], model=body["model"], version=body["version"],
                hardware=body["hardware"], min_instances=body["min_instances"], max_instances=body["max_instances"],
                release=1, released_at=now, offline_since=now if body["min_instances"] == 0 else None,
            )
            self.deployments[key] = deployment
            return deployment.as_json()

    def _deployment(self, owner: str, name: str) -> _Deployment:
        deployment = self.deployments.get(f"{owner}/{name}")
        if deployment is None:
            raise ApiError(404, f"Deployment {owner}/{name} not found")
        return deployment

    def get_deployment(self, request: Request) -> dict:
        with self.lock:
            return self._deployment(request.params["owner"], request.params["name"]).as_json()

    def list_deployments(self, request: Request) -> dict:
        with self.lock:
            return {"next": None, "previous": None, "results": [d.as_json() for d in self.deployments.values()]}

    def update_deployment(self, request: Request) -> dict:
        body = self._body(request)
        unknown = [key for key in body if key not in ("version", "hardware", "min_instances", "max_instances")]
        if unknown:
            raise ApiError(422, "these properties cannot be updated: " + ", ".join(unknown), unknown)
        with self.lock:
            deployment = self._deployment(request.params["owner"], request.params["name"])
            self._validate_release(body, deployment.model)
            minimum = body.get("min_instances", deployment.min_instances)
            if minimum > body.get("max_instances", deployment.max_instances):
                raise ApiError(422, "min_instances cannot be greater than max_instances")
            for key, value in body.items():
                setattr(deployment, key, value)
            now = self.clock()
            if minimum > 0:
                deployment.offline_since = None
            elif deployment.offline_since is None:
                deployment.offline_since = now
            deployment.release += 1
            deployment.released_at = now
            return deployment.as_json()

    def delete_deployment(self, request: Request) -> Response:
        with self.lock:
            deployment = self._deployment(request.params["owner"], request.params["name"])
            offline = deployment.offline_since
            if offline is None or self.clock() - offline < DEPLOYMENT_OFFLINE_SECONDS:
                raise ApiError(409, "Deployments can only be deleted after they have been offline and unused "
                                    "for at least 15 minutes")
            del self.deployments[f"{deployment.owner}/{deployment.name}"]
            return Response(204)

    # ---------------------------------------------------------------------------------------------- files

    def create_file(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "the request must be multipart/form-data with a `content` part")
        if len(request.raw) > MAX_FILE_BYTES:
            raise ApiError(413, "Files must be less than 100MB in size")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + request.raw
        )
        parts = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        if "content" not in parts:
            raise ApiError(422, "content is required", ["content"])
        content_part = parts["content"]
        data = cast(bytes, content_part.get_payload(decode=True) or b"")  # a leaf part, decoded: its bytes
        filename = parts["filename"].get_content().strip() if "filename" in parts else content_part.get_filename() or "file"
        mime = parts["type"].get_content().strip() if "type" in parts else content_part.get_content_type()
        try:
            metadata = json.loads(parts["metadata"].get_content()) if "metadata" in parts else {}
        except json.JSONDecodeError:
            raise ApiError(422, "metadata must be valid JSON", ["metadata"]) from None
        with self.lock:
            file_id = self._new_id("file")
            now = self.clock()
            self._file_content[file_id] = data
            self.files[file_id] = {
                "id": file_id,
                "name": filename,
                "content_type": mime,
                "size": len(data),
                "etag": hashlib.md5(data).hexdigest(),  # an ETag, not security
                "checksums": {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()},
                "metadata": metadata,
                "created_at": _iso(now),
                "expires_at": _iso(now + FILE_LIFETIME_SECONDS),
                "urls": {"get": f"http://{request.headers.get('host', 'api.replicate.com')}/v1/files/{file_id}"},
            }
            return Response(201, self.files[file_id])

    def file_content(self, file_id: str) -> bytes:
        return self._file_content[file_id]

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise ApiError(404, "File not found")
        return self.files[file_id]

    def get_file(self, request: Request) -> dict:
        with self.lock:
            return self._file(request.params["file_id"])

    def list_files(self, request: Request) -> dict:
        with self.lock:
            newest_first = sorted(self.files.values(), key=lambda f: f["created_at"], reverse=True)
            return {"next": None, "previous": None, "results": newest_first}

    def delete_file(self, request: Request) -> Response:
        with self.lock:
            self._file(request.params["file_id"])
            del self.files[request.params["file_id"]]
            del self._file_content[request.params["file_id"]]
            return Response(204)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8788)
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the API token requests must carry")
    parser.add_argument("--account", default=DEFAULT_ACCOUNT)
    parser.add_argument("--start-seconds", type=float, default=2.0, help="how long a training stays `starting`")
    parser.add_argument("--run-seconds", type=float, default=10.0, help="how long a training stays `processing`")
    parser.add_argument("--outcome", choices=OUTCOMES, default="succeeded", help="how trainings end")
    args = parser.parse_args(argv)
    api = ReplicateApi(tokens=(args.token,), account=args.account, start_seconds=args.start_seconds,
                       run_seconds=args.run_seconds, outcome=args.outcome)
    with serve(api, args.host, args.port) as url:
        print(f"Replicate emulator on {url} (REPLICATE_BASE_URL={url}); Ctrl-C stops it", file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
