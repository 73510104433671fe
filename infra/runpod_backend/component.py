"""RunpodTraining: one stack's training run on RunPod: a network volume (when configured), a local dataset folder
uploaded to it (DatasetUpload, dataset.py) and the pod, which waits for that upload and trains on exactly it.

The pod's environment is the contract of training/spec.py (ENV_*): the spec and limits as JSON, the run id,
the volume as workspace with the Hugging Face cache on it, the reaper's label, the volume's size; HF_TOKEN /
WANDB_API_KEY when set, and a dataset URL's credentials: the spec holds the URL without them and the whole URL
travels as ENV_DATASET_SOURCE. With any of these the whole env is a secret Output (one property in the state).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import cast

import pulumi

from contract.dataset import DatasetError
from contract.naming import MANAGED_LABEL, pod_name, run_id
from contract.redaction import redacted_source
from contract.spec import (
    ENV_DATASET_SOURCE,
    ENV_LIMITS,
    ENV_RUN_ID,
    ENV_SPEC,
    ENV_STACK,
    ENV_WORKSPACE,
    MAX_ENV_VALUE_BYTES,
    WORKSPACE_MOUNT,
    TrainSpec,
)
from contract.workspace import RunPaths
from infra.config import StackConfig
from infra.runpod_backend import s3 as runpod_s3
from infra.runpod_backend import uploads
from infra.runpod_backend.dataset import DatasetUpload, DatasetUploadArgs
from infra.runpod_backend.pod import Pod, PodArgs
from infra.runpod_backend.volume import NetworkVolume, NetworkVolumeArgs

# secret config key -> the pod's variable
POD_SECRET_ENV = {"hfToken": "HF_TOKEN", "wandbApiKey": "WANDB_API_KEY"}
CONSOLE_URL = "https://console.runpod.io/pods?id={pod_id}"
ENV_VOLUME_GB = "LORASTACK_VOLUME_GB"
# the whole environment, well inside what Linux takes for a process start (ARG_MAX, typically 2 MiB in all)
MAX_POD_ENV_BYTES = 256 * 1024


@dataclass
class RunpodTrainingArgs:
    stack: str
    config: StackConfig
    image_ref: pulumi.Input[str]
    # runpodApiKey, hfToken, wandbApiKey (infra.credentials.secret()); None where not set
    secrets: Mapping[str, pulumi.Output | None] = field(default_factory=dict)


class RunpodTraining(pulumi.ComponentResource):
    volume: NetworkVolume | None
    dataset: DatasetUpload | None
    pod: Pod
    exports: dict[str, object]  # the stack outputs

    def __init__(self, name: str, args: RunpodTrainingArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("lorastack:runpod:Training", name, None, opts)
        config, stack = args.config, args.stack
        runpod = config.runpod
        if runpod is None:
            raise ValueError(f"stack {stack}: RunpodTraining needs the lorastack:runpod section")
        if args.secrets.get("runpodApiKey") is None:
            # the providers read the key themselves (configure()); without one, fail before anything is planned
            raise pulumi.RunError("no RunPod API key: `pulumi config set --secret runpodApiKey ...` or export RUNPOD_API_KEY")

        self.volume = None
        if runpod.volume is not None:
            kept = runpod.volume.keep_on_destroy
            self.volume = NetworkVolume(
                f"{name}-volume",
                NetworkVolumeArgs(
                    # a volume has its data center (RunpodConfig requires one with a volume)
                    name=pod_name(stack), size_gb=runpod.volume.size_gb, data_center=cast(str, runpod.data_center),
                    keep_on_destroy=kept,
                ),
                # kept: `pulumi destroy` forgets the volume and says so, and never calls the provider's delete
                pulumi.ResourceOptions(parent=self, retain_on_delete=kept),
            )
        # The volume's `id`, not its volumeId output: an id stays known in the preview of an update, an output
        # of a dynamic resource does not, and an unknown volume id would preview as a pod replacement.
        volume_id = self.volume.id if self.volume else None
        data_center = runpod.data_center  # with a volume: the volume's (config validation requires it)
        local = local_dataset(config, args.secrets, volume_id, data_center)
        self.dataset = None
        if local is not None:
            pulumi.log.info(f"dataset {local.folder}: {local.describe()} -> {local.volume_path}", resource=self)
            self.dataset = DatasetUpload(
                f"{name}-dataset",
                DatasetUploadArgs(source=config.train.dataset.source, dataset=local,
                                  caption_extension=config.train.dataset.caption_extension,
                                  default_caption=config.train.dataset.default_caption,
                                  # a local folder is uploaded to the volume, so both are set (RunpodBackend.check)
                                  volume_id=cast(pulumi.Output[str], volume_id), data_center=cast(str, data_center)),
                pulumi.ResourceOptions(parent=self),
            )
        spec = uploads.pod_spec(config.train, local)
        run = run_id(stack, spec)

        self.pod = Pod(
            f"{name}-pod",
            PodArgs(
                name=pod_name(stack),
                image=args.image_ref,
                gpu_type_id=runpod.gpu_type,
                gpu_count=runpod.gpu_count,
                cloud=runpod.cloud,
                data_center_ids=[data_center] if data_center else [],
                container_disk_gb=runpod.container_disk_gb,
                env=pod_env(stack, config, args.secrets, spec),
                network_volume_id=volume_id,
                volume_mount_path=WORKSPACE_MOUNT,
            ),
            # a dependency, not a race: the pod is created once the dataset is complete on the volume
            pulumi.ResourceOptions(parent=self, depends_on=[self.dataset] if self.dataset else None),
        )

        gpu = runpod.gpu_type if runpod.gpu_count == 1 else f"{runpod.gpu_count}x {runpod.gpu_type}"
        self.exports = {
            "provider": "runpod",
            "volumeId": volume_id,
            "dataCenter": data_center or self.pod.dataCenterId,  # unpinned: where RunPod placed the pod
            "podId": self.pod.id,
            "gpu": f"{gpu} ({runpod.cloud})",
            **config.cost_estimate().as_outputs(),
            "runId": run,
            "consoleUrl": self.pod.id.apply(lambda pod_id: CONSOLE_URL.format(pod_id=pod_id)),
            "logsCommand": f"make logs STACK={stack}",
        }
        if local is not None:
            self.exports["dataset"] = {"contentHash": local.content_hash, "files": local.file_count,
                                       "bytes": local.total_bytes, "volumePath": local.volume_path}
        if config.wait:  # `up` follows the run to its end and downloads the LoRA (infra/runpod_backend/follow.py)
            from infra.runpod_backend.follow import follow_in_program

            self.exports["run"] = follow_in_program(
                self, stack, run, self.pod.id, volume_id, data_center, config.train.hf_repo, config.limits.max_hours,
                config.backend.hardware(config),
            )
        self.register_outputs(self.exports)


def local_dataset(config: StackConfig, secrets: Mapping[str, pulumi.Output | None], volume_id: pulumi.Input[str] | None,
                  data_center: str | None) -> uploads.LocalDataset | None:
    """The stack's local `train.dataset.source` folder, hashed (None for other sources). Hashed here, in preview
    too, so the preview shows hash, files and bytes and the run id is known before anything is sent."""
    try:
        local = uploads.scan_spec(config.train)
    except DatasetError as error:
        raise pulumi.RunError(str(error)) from None
    if local is None:
        return None
    if volume_id is None or data_center is None:  # the schema refuses this already (RunpodBackend.check)
        raise pulumi.RunError("lorastack:train.dataset.source is a local folder: it needs a network volume "
                              "(lorastack:runpod.volume) to be uploaded to")
    if any(secrets.get(key) is None for key in (runpod_s3.ACCESS_KEY, runpod_s3.SECRET_KEY)):
        raise pulumi.RunError(
            f"lorastack:train.dataset.source is a local folder, uploaded through RunPod's S3 API: "
            f"`pulumi config set --secret {runpod_s3.ACCESS_KEY} user_...` and `pulumi config set --secret "
            f"{runpod_s3.SECRET_KEY} rps_...` (RunPod console > Settings > S3 API Keys), or export "
            f"{runpod_s3.ACCESS_KEY_ENV} and {runpod_s3.SECRET_KEY_ENV}")
    return local


def pod_env(stack: str, config: StackConfig, secrets: Mapping[str, pulumi.Output | None],
            spec: TrainSpec | None = None) -> pulumi.Input[dict[str, str]]:
    """The pod's environment: plain when no secret is in it, otherwise one secret Output. `spec`: the stack's
    (the default), or with a local dataset's source pointing at its upload (uploads.pod_spec).

    The volume's size is in it (ENV_VOLUME_GB) so that growing a full volume changes the pod's inputs: the
    update starts the stopped pod again and the run resumes (a stopped pod is started only on a new image or env).
    """
    spec = spec or config.train
    volume = config.runpod.volume if config.runpod else None
    source = spec.dataset.source
    written = redacted_source(source)  # credentials in the URL travel as a secret variable only
    spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"source": written})})
    plain = {
        **({ENV_VOLUME_GB: str(volume.size_gb)} if volume is not None else {}),
        ENV_SPEC: spec.to_env_json(),
        ENV_LIMITS: config.run_limits().model_dump_json(by_alias=True),
        ENV_RUN_ID: run_id(stack, spec),
        ENV_STACK: stack,
        ENV_WORKSPACE: WORKSPACE_MOUNT,
        # the pod's POSIX path, whatever this machine's paths are: RunPaths only joins names onto it
        "HF_HOME": str(RunPaths(cast(Path, PurePosixPath(WORKSPACE_MOUNT)), run_id(stack, spec)).hf_home),
        **MANAGED_LABEL,
    }
    tokens = {variable: secrets[key] for key, variable in POD_SECRET_ENV.items() if secrets.get(key) is not None}
    if written != source:
        tokens[ENV_DATASET_SOURCE] = pulumi.Output.secret(source)
    if not tokens:
        return startable_env(plain)
    return pulumi.Output.secret(pulumi.Output.all(**tokens).apply(lambda values: startable_env({**plain, **values})))


def startable_env(env: dict[str, str]) -> dict[str, str]:
    """`env`, when a process can start with it; otherwise a ValueError naming the variable and the limit (a
    pod whose entrypoint cannot start bills with none of the trainer's safeguards running)."""
    sizes = {name: len(f"{name}={value}".encode()) + 1 for name, value in env.items()}
    too_long = [name for name, size in sizes.items() if size > MAX_ENV_VALUE_BYTES]
    if too_long:
        raise ValueError(f"the pod's {', '.join(too_long)} would take {max(sizes[n] for n in too_long)} bytes; Linux "
                         f"starts no process with an environment string over {MAX_ENV_VALUE_BYTES} bytes")
    if sum(sizes.values()) > MAX_POD_ENV_BYTES:
        raise ValueError(f"the pod's environment would take {sum(sizes.values())} bytes; at most {MAX_POD_ENV_BYTES}")
    return env
