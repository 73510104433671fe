"""The LoRA from the Hugging Face Hub (train.hfRepo): the same for every backend, since the trainer pushes it there."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from infra.backends import OpsError
from infra.credentials import SECRETS


def fetch_from_hub(repo_id: str, destination: Path, environ: Mapping[str, str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = environ.get(SECRETS["hfToken"]) or None
    print(f"downloading {repo_id} from the Hugging Face Hub into {destination} ...", file=sys.stderr, flush=True)
    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="model", local_dir=destination, token=token))
    except RepositoryNotFoundError:
        hint = "" if token else " (it is private, as the trainer creates it: export HF_TOKEN=<token with read access>)"
        raise OpsError(f"Hub repo {repo_id} not found or not readable{hint}") from None
    except HfHubHTTPError as error:
        raise OpsError(f"download of {repo_id} failed: {error}") from None
