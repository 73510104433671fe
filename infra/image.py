"""The trainer image: build and push it (`make image`), or let a stack with `image.build: true` do it.

    python -m infra.image [--version X] [--repository R] [--push/--no-push] [--print-digest-only]

Builds container/Dockerfile with the Docker SDK from the repository root, filtered by container/.dockerignore,
tags `<repository>:<version>` (version from training/version.py unless given), pushes, and prints the digest
reference `repository:version@sha256:...` to pin in a stack (the form infra.config.ImageConfig parses; the
registry resolves the digest, the tag is there for people).

`TrainerImage` (infra/image_component.py) is the Pulumi side: a pulumi-command `local.Command` runs this CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from infra.config import DEFAULT_REPOSITORY
from infra.paths import REPO_ROOT
from training.version import __version__

DOCKERFILE = "container/Dockerfile"
DOCKERIGNORE = "container/.dockerignore"
PLATFORM = "linux/amd64"  # RunPod's GPU hosts


class ImageError(RuntimeError):
    pass


# -- what goes into the image ------------------------------------------------------------------------------


def ignore_patterns(root: Path = REPO_ROOT) -> list[str]:
    lines = (root / DOCKERIGNORE).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def context_files(root: Path = REPO_ROOT) -> list[str]:
    """The files of the build context (relative, sorted), as Docker selects them through .dockerignore."""
    from docker.utils.build import exclude_paths

    selected = exclude_paths(str(root), ignore_patterns(root), dockerfile=DOCKERFILE)
    return sorted(path for path in selected if (root / path).is_file())


def content_hash(root: Path, files: Iterable[str]) -> str:
    """sha256 over the sorted (path, content) pairs, skipping __pycache__ and .pyc: the image's identity."""
    digest = hashlib.sha256()
    for relative in sorted(files):
        parts = Path(relative).parts
        if "__pycache__" in parts or relative.endswith(".pyc"):
            continue
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256((root / relative).read_bytes()).digest())
    return digest.hexdigest()


def tree_hash(root: Path = REPO_ROOT) -> str:
    return content_hash(root, context_files(root))


# -- build and push ----------------------------------------------------------------------------------------


def git_revision(root: Path = REPO_ROOT) -> str:
    """HEAD's commit, with -dirty when the image's own files differ from it (the label must not lie)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        revision = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *context_files(root))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{revision}-dirty" if changed else revision


def git_source(root: Path = REPO_ROOT) -> str:
    try:
        url = subprocess.run(
            ["git", "remote", "get-url", "origin"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    # only a plain https URL: an ssh remote or one with credentials in it does not belong in a public label
    return url if url.startswith("https://") and "@" not in url else ""


def docker_client():
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as error:
        raise ImageError(
            "no Docker engine is reachable (is Docker running, and is DOCKER_HOST right?): "
            f"{error}. Build on a machine with Docker, or let CI build on tag."
        ) from None
    return client


def _follow(events: Iterable[dict], log: Callable[[str], None]) -> list[dict]:
    seen = []
    for event in events:
        seen.append(event)
        if "error" in event:
            raise ImageError(event["error"].strip())
        text = event.get("stream") or event.get("status")
        if text and text.strip():
            log(text.rstrip())
    return seen


def build_and_push(
    version: str,
    repository: str,
    push: bool = True,
    root: Path = REPO_ROOT,
    client=None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> str:
    """Build `<repository>:<version>`; push it and return `repository:version@sha256:...` (or the local image id)."""
    from docker.utils.build import tar

    client = client or docker_client()
    tag = f"{repository}:{version}"
    build_args = {"VERSION": version, "REVISION": git_revision(root), "SOURCE": git_source(root)}
    log(f"building {tag} (revision {build_args['REVISION']})")
    context = tar(str(root), exclude=ignore_patterns(root), dockerfile=(DOCKERFILE, None))
    events = client.api.build(
        fileobj=context,
        custom_context=True,
        dockerfile=DOCKERFILE,
        tag=tag,
        buildargs=build_args,
        platform=PLATFORM,
        pull=True,
        rm=True,
        decode=True,
    )
    _follow(events, log)
    if not push:
        return client.images.get(tag).id
    log(f"pushing {tag}")
    pushed = _follow(client.api.push(repository, tag=version, stream=True, decode=True), log)
    digests = [event["aux"]["Digest"] for event in pushed if "Digest" in event.get("aux", {})]
    if not digests:
        raise ImageError(f"the registry reported no digest for {tag}")
    return f"{tag}@{digests[-1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=__version__, help=f"image tag (default {__version__}, training/version.py)")
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"registry/name (default {DEFAULT_REPOSITORY})")
    parser.add_argument("--push", action=argparse.BooleanOptionalAction, default=True, help="push after building")
    parser.add_argument("--print-digest-only", action="store_true", help="stdout: only the digest reference")
    args = parser.parse_args(argv)
    try:
        reference = build_and_push(args.version, args.repository, push=args.push)
    except ImageError as error:
        print(f"image: {error}", file=sys.stderr)
        return 1
    if args.print_digest_only:
        print(reference)
    elif args.push:
        print(f"pushed {args.repository}:{args.version}\npin it in a stack: image: {reference}")
    else:
        print(f"built {args.repository}:{args.version} ({reference}), not pushed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
