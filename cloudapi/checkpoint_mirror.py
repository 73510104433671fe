"""A copy of the run's checkpoints and LoRA in a Hugging Face Hub model repo, for machines without lasting storage.

Set by infra through LORASTACK_CHECKPOINT_REPO (contract/spec.py); the trainer gets it from
`cloudapi.hosts.mirror_from_environment`, beside the rest of its view of the machine's storage. The repo holds the run
directory's layout relative to the storage root (`runs/<run id>/checkpoints/step-<n>/…`, `runs/<run id>/lora/…`),
so a fresh machine restores the newest complete checkpoint to the same place on its own disk and the trainer
resumes from it as it would from a volume. A checkpoint is uploaded only once complete (after its atomic rename) in one commit,
so a directory in the repo is always whole; the rest of the run's directory (LoRA, samples, status, DONE) goes up in
one commit before the job ends. Errors are raised with the token redacted; the trainer logs them and goes on.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from contract.workspace import RunPaths

COMPLETE_MARK = "trainer.json"  # training/checkpoints.py writes it last: a checkpoint directory holding it is whole
_STEP = re.compile(r"^step-(\d+)$")

Log = Callable[[str], None]


class HubCheckpointMirror:
    """The run mirrored to a Hub model repo (cloudapi.hosts.Mirror). Errors are raised with the token redacted."""

    def __init__(self, repo_id: str, token: str | None, private: bool, endpoint: str | None = None):
        """`endpoint`: the Hub's address (HF_ENDPOINT), None for the client's default."""
        self.repo_id, self.private, self.endpoint = repo_id, private, endpoint
        self._token = token
        self._repo_ready = False

    def _api(self):
        from huggingface_hub import HfApi  # imported late: HF_HOME is read at import, and set by the trainer first

        return HfApi(token=self._token, endpoint=self.endpoint)

    def _failure(self, action: str, error: Exception) -> RuntimeError:
        text = f"{type(error).__name__}: {error}"
        text = (text.replace(self._token, "***") if self._token else text)[:300]
        return RuntimeError(f"could not {action} the Hub repo {self.repo_id}: {text}")

    def where(self, paths: RunPaths) -> str:
        return f"the Hub repo {self.repo_id}"

    def _publish(self, folder: Path, storage_root: Path, ignore: list[str] | None = None) -> None:
        """Upload `folder` (inside `storage_root`) to the same relative path in the repo, in one commit."""
        path_in_repo = PurePosixPath(folder.relative_to(storage_root)).as_posix()
        try:
            api = self._api()
            if not self._repo_ready:
                api.create_repo(repo_id=self.repo_id, repo_type="model", private=self.private, exist_ok=True)
                self._repo_ready = True
            api.upload_folder(repo_id=self.repo_id, repo_type="model", folder_path=str(folder),
                              path_in_repo=path_in_repo, commit_message=f"lorastack: {path_in_repo}",
                              ignore_patterns=ignore)
        except Exception as error:  # the caller says so; the files are still on this machine's disk
            raise self._failure(f"copy {path_in_repo} to", error) from None

    def push_checkpoint(self, paths: RunPaths, directory: Path) -> None:
        self._publish(directory, paths.root)

    def push_results(self, paths: RunPaths) -> int:
        """The run's directory but its checkpoints (the LoRA, samples, status, history, DONE), in one commit."""
        if not paths.run.is_dir():
            return 0
        ignore = ["checkpoints/*", "*.partial"]
        files = [file for file in paths.run.rglob("*") if file.is_file() and not file.name.endswith(".partial")
                 and file.relative_to(paths.run).parts[0] != "checkpoints"]
        if files:
            self._publish(paths.run, paths.root, ignore)
        return len(files)

    def newest_checkpoint(self, paths: RunPaths) -> str | None:
        """The repo path of the newest complete checkpoint of this run, None when there is none (or no repo)."""
        from huggingface_hub.errors import RepositoryNotFoundError

        prefix = PurePosixPath(paths.checkpoints.relative_to(paths.root)).as_posix() + "/"
        try:
            files = self._api().list_repo_files(repo_id=self.repo_id, repo_type="model")
        except RepositoryNotFoundError:
            return None  # the first run: the repo is created at the first checkpoint
        steps = []
        for name in files:
            parts = name.removeprefix(prefix).split("/") if name.startswith(prefix) else []
            if len(parts) == 2 and parts[1] == COMPLETE_MARK and (match := _STEP.match(parts[0])):
                steps.append((int(match.group(1)), prefix + parts[0]))
        return max(steps)[1] if steps else None

    def restore(self, paths: RunPaths, log: Log) -> None:
        """Download the newest complete checkpoint of the run into its place under `paths.root` unless this disk has
        it already."""
        try:
            newest = self.newest_checkpoint(paths)
            if newest is None or (paths.root / newest / COMPLETE_MARK).is_file():
                return
            from huggingface_hub import snapshot_download

            # into a temporary place first: a download cut short must not look like a checkpoint
            staging = paths.root / ".mirror-download"
            shutil.rmtree(staging, ignore_errors=True)
            snapshot_download(repo_id=self.repo_id, repo_type="model", allow_patterns=[f"{newest}/*"],
                              local_dir=str(staging), token=self._token, endpoint=self.endpoint)
            target = paths.root / newest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete one (no trainer.json) is never kept
            (staging / newest).rename(target)
            shutil.rmtree(staging, ignore_errors=True)
        except Exception as error:
            raise self._failure("restore a checkpoint from", error) from None
        log(f"restored {newest} from the Hub repo {self.repo_id}")
