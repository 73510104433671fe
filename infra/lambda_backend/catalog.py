"""Lambda Cloud's instance types (names, GPUs, memory, $/hour) and regions, dated: the offline fallback and the
validation list.

Instance type names are Lambda's (`GET /api/v1/instance-types` -> `instance_type.name`), regions its
PublicRegionCode enum (lambda-cloud-openapi.json v1.8.3). `make cost` and the stack outputs prefer the live
`price_cents_per_hour` when the API answers, and say which source they used.
"""

from __future__ import annotations

from dataclasses import dataclass

LAMBDA_PRICES_SOURCE = (
    "Lambda Cloud GET /api/v1/instance-types reply recorded 2025-11-22 (alexandervaneck/lambda-ai-cloud-api-client, "
    "tests/data/m_instance_types_response.json), price_cents_per_hour"
)
LIVE_PRICES_SOURCE = "Lambda Cloud instance-types API (live)"
# "$0.20/GiB/month" as the billing page's example rate (docs.lambda.ai/public-cloud/billing); billed hourly on GiB
# used, for as long as the filesystem exists, mounted or not
FILESYSTEM_USD_PER_GIB_MONTH = 0.20


@dataclass(frozen=True)
class InstanceType:
    name: str  # Lambda's instance type name, what an instance is launched with
    gpu: str  # the GPU by the name CUDA reports (infra/pricing.py's RELATIVE_SPEED keys)
    gpu_count: int
    memory_gb: int  # per GPU
    usd_per_hour: float  # the whole instance

    @property
    def label(self) -> str:
        return f"{self.gpu_count}x {self.gpu.removeprefix('NVIDIA ')}"


LAMBDA_INSTANCE_TYPES: dict[str, InstanceType] = {
    kind.name: kind
    for kind in (
        InstanceType("gpu_1x_a10", "NVIDIA A10", 1, 24, 0.75),
        InstanceType("gpu_1x_rtx6000", "Quadro RTX 6000", 1, 24, 0.50),
        InstanceType("gpu_1x_a6000", "NVIDIA RTX A6000", 1, 48, 0.80),
        InstanceType("gpu_2x_a6000", "NVIDIA RTX A6000", 2, 48, 1.60),
        InstanceType("gpu_1x_a100", "NVIDIA A100-PCIE-40GB", 1, 40, 1.29),
        InstanceType("gpu_1x_a100_sxm4", "NVIDIA A100-SXM4-40GB", 1, 40, 1.29),
        InstanceType("gpu_8x_a100", "NVIDIA A100-SXM4-40GB", 8, 40, 10.32),
        InstanceType("gpu_8x_a100_80gb_sxm4", "NVIDIA A100-SXM4-80GB", 8, 80, 14.32),
        InstanceType("gpu_1x_h100_pcie", "NVIDIA H100 PCIe", 1, 80, 2.49),
        InstanceType("gpu_1x_h100_sxm5", "NVIDIA H100 80GB HBM3", 1, 80, 3.29),
        InstanceType("gpu_2x_h100_sxm5", "NVIDIA H100 80GB HBM3", 2, 80, 6.38),
        InstanceType("gpu_4x_h100_sxm5", "NVIDIA H100 80GB HBM3", 4, 80, 12.36),
        InstanceType("gpu_8x_h100_sxm5", "NVIDIA H100 80GB HBM3", 8, 80, 23.92),
        InstanceType("gpu_1x_gh200", "NVIDIA GH200 480GB", 1, 96, 1.49),
        InstanceType("gpu_8x_b200_sxm6", "NVIDIA B200", 8, 180, 39.92),
    )
}

LAMBDA_REGIONS = (
    "europe-central-1", "asia-south-1", "australia-east-1", "me-west-1", "asia-northeast-1", "asia-northeast-2",
    "us-east-1", "us-west-2", "us-west-1", "us-south-1", "us-west-3", "us-midwest-1", "us-east-2", "us-south-2",
    "us-south-3", "us-east-3", "us-midwest-2",
)


def lambda_usd_per_hour(instance_type: str, live: dict[str, dict] | None = None) -> tuple[float, str]:
    """$/hour of the instance; `live` is GET /api/v1/instance-types' data when the API was reachable."""
    entry = (live or {}).get(instance_type)
    if entry is not None:
        return entry["instance_type"]["price_cents_per_hour"] / 100, LIVE_PRICES_SOURCE
    return LAMBDA_INSTANCE_TYPES[instance_type].usd_per_hour, LAMBDA_PRICES_SOURCE
