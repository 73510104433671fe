"""Credentials: the secret config keys and the environment variables that stand in for them.

Secrets are never part of StackConfig, so they never land in a plain object that could be logged or pickled.
"""

from __future__ import annotations

import os

# Secret config keys and the environment variables that stand in for them (CI, local shells).
SECRETS = {
    "runpodApiKey": "RUNPOD_API_KEY",
    "replicateApiToken": "REPLICATE_API_TOKEN",
    "hfToken": "HF_TOKEN",
    "wandbApiKey": "WANDB_API_KEY",
    # RunPod's S3-compatible API for network volumes (dataset uploads, make fetch): a key pair separate from the
    # API key, made under Settings > S3 API Keys; the access key is the user id (user_...), the secret rps_...
    "runpodS3AccessKey": "RUNPOD_S3_ACCESS_KEY",
    "runpodS3Secret": "RUNPOD_S3_SECRET_KEY",
}


def secret(name: str, pulumi_config: object | None = None) -> object | None:
    """A secret from Pulumi config (stays a secret Output) or, failing that, its environment variable."""
    if pulumi_config is not None:
        value = pulumi_config.get_secret(name)
        if value is not None:
            return value
    env = os.environ.get(SECRETS[name])
    if env and pulumi_config is not None:
        import pulumi

        return pulumi.Output.secret(env)
    return env
