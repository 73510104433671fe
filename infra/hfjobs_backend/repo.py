"""HubRepo: the Hub model repo that holds a stack's checkpoints and LoRA, as a Pulumi dynamic resource.

It outlives the jobs (a new job resumes from it) and is kept on `pulumi destroy` unless the stack sets
`checkpointRepo.keepOnDestroy: false` (the component then lets the provider delete it). Create is
`create_repo(exist_ok=True)`: retry-safe by itself, and an existing repo of the user's is adopted as it is.
Privacy is the one setting that changes in place (`update_repo_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import CheckFailure, CheckResult, CreateResult, ReadResult, UpdateResult
from pulumi.dynamic.dynamic import PROVIDER_KEY

from infra.dynamic import CredentialedProvider, is_unknown, keyed_diff
from infra.hfjobs_backend.client import endpoint, is_not_found


class HubRepoProvider(CredentialedProvider):
    """Inputs: repoId, private. Outputs add url."""

    credential = "hfToken"

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=endpoint(), token=self.credential_value())

    def check(self, olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        failures = []
        repo_id = news.get("repoId")
        if not is_unknown(repo_id) and not (isinstance(repo_id, str) and repo_id.count("/") == 1):
            failures.append(CheckFailure("repoId", f"must be 'namespace/name' (got {repo_id!r})"))
        if not is_unknown(news.get("private")) and not isinstance(news.get("private"), bool):
            failures.append(CheckFailure("private", "must be true or false"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]):
        return keyed_diff(olds, news, ("repoId",), ("private",))

    def create(self, props: dict[str, Any]) -> CreateResult:
        url = self._api().create_repo(repo_id=props["repoId"], repo_type="model", private=props["private"],
                                      exist_ok=True)
        return CreateResult(props["repoId"], _outputs(props, str(url)))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        try:
            info = self._api().model_info(repo_id=id_)
        except Exception as error:
            if is_not_found(error):
                return ReadResult("", {})
            raise
        return ReadResult(id_, _outputs({**props, "repoId": id_, "private": bool(info.private)},
                                        f"{endpoint()}/{id_}"))

    def update(self, id_: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        self._api().update_repo_settings(repo_id=id_, repo_type="model", private=news["private"])
        return UpdateResult(_outputs(news, f"{endpoint()}/{id_}"))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        self._api().delete_repo(repo_id=id_, repo_type="model", missing_ok=True)


def _outputs(props: dict[str, Any], url: str) -> dict[str, Any]:
    return {**{key: value for key, value in props.items() if key != PROVIDER_KEY}, "url": url}


@dataclass
class HubRepoArgs:
    repo_id: pulumi.Input[str]
    private: pulumi.Input[bool] = True


class HubRepo(pulumi.dynamic.Resource, module="hfjobs", name="HubRepo"):
    url: pulumi.Output[str]

    def __init__(self, resource_name: str, args: HubRepoArgs, opts: pulumi.ResourceOptions | None = None):
        props = {"repoId": args.repo_id, "private": args.private, "url": None}
        super().__init__(HubRepoProvider(), resource_name, props, opts)
