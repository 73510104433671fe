"""The `lorastack:runpod` section of a stack file: which GPU, where, and the network volume."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from contract.spec import _Schema
from infra.runpod_backend.catalog import RUNPOD_DATA_CENTERS, RUNPOD_GPUS, GpuType


class VolumeConfig(_Schema):
    size_gb: int = Field(default=100, ge=10, le=4096)
    keep_on_destroy: bool = True  # datasets, model cache and checkpoints survive `pulumi destroy`


class RunpodConfig(_Schema):
    gpu_type: str
    gpu_count: int = Field(default=1, ge=1, le=8)
    cloud: Literal["SECURE", "COMMUNITY"] = "SECURE"
    data_center: str | None = None
    container_disk_gb: int = Field(default=40, ge=10, le=1000)
    volume: VolumeConfig | None = Field(default_factory=VolumeConfig)
    # `volume: null` puts datasets, the model cache and checkpoints on the container disk, which a restarted or
    # moved pod loses: a stack must say it knows (a lost pod then starts over, and pays for it again)
    checkpoints_lost_with_container: bool = False

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, value: str) -> str:
        if value not in RUNPOD_GPUS:
            raise ValueError("unknown RunPod GPU id; allowed: " + ", ".join(sorted(RUNPOD_GPUS)))
        return value

    @field_validator("data_center")
    @classmethod
    def _known_data_center(cls, value: str | None) -> str | None:
        if value is not None and value not in RUNPOD_DATA_CENTERS:
            raise ValueError("unknown RunPod data center; allowed: " + ", ".join(RUNPOD_DATA_CENTERS))
        return value

    @model_validator(mode="after")
    def _no_volume_is_stated(self) -> RunpodConfig:
        if self.volume is None and not self.checkpoints_lost_with_container:
            raise ValueError(
                "volume is null: checkpoints, datasets and the model cache would live on the container disk and be "
                "lost whenever the pod stops or restarts; set volume: {sizeGb: ...}, or state the loss with "
                "checkpointsLostWithContainer: true"
            )
        if self.volume is not None and self.checkpoints_lost_with_container:
            raise ValueError("checkpointsLostWithContainer is true but a volume is set (checkpoints are kept on it); "
                             "remove one of the two")
        return self

    @model_validator(mode="after")
    def _volume_rules(self) -> RunpodConfig:
        if self.volume is not None:
            if self.cloud != "SECURE":
                raise ValueError("a network volume needs cloud: SECURE (Community Cloud pods cannot mount one)")
            if self.data_center is None:
                raise ValueError("a network volume is pinned to one data center: set dataCenter (the pod runs there)")
        if self.cloud == "COMMUNITY" and self.gpu.community_usd is None:
            raise ValueError(f"{self.gpu_type} is not offered on Community Cloud; use cloud: SECURE")
        return self

    @property
    def gpu(self) -> GpuType:
        return RUNPOD_GPUS[self.gpu_type]
