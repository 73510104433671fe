"""No package of ours may shadow a dependency's (or the standard library's) top-level import name.

Pulumi's language host runs the program with `runpy.run_path(".")` in Pulumi.yaml's `main` (infra/), which puts
that directory first on `sys.path`; the dynamic-provider host (`python -m pulumi.dynamic`) starts there too, with
it as `sys.path[0]`. A module or package there named like a dependency (`infra/replicate/` once hid the
`replicate` client) is imported in its place. The same goes for every directory of this repository that the
editable install puts on `sys.path`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

from emulator.language_host import PROJECT_ROOT, Project

OUR_DISTRIBUTION = "lorastack"


def importable_names(directory: Path) -> set[str]:
    """Top-level names `import x` finds in `directory`: modules, extension modules, packages (regular or
    namespace: a plain folder is enough to shadow a namespace package of the same name)."""
    suffixes = tuple(importlib.machinery.all_suffixes())
    names = set()
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.isidentifier() and entry.name != "__pycache__":
            names.add(entry.name)
        elif entry.is_file() and entry.name.endswith(suffixes):
            name = entry.name.split(".")[0]
            if name.isidentifier():
                names.add(name)
    return names


def taken_names() -> dict[str, str]:
    """Import name -> who owns it: the standard library, or the installed distributions other than ours."""
    taken = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, distributions in importlib.metadata.packages_distributions().items():
        others = [dist for dist in distributions if dist.lower() != OUR_DISTRIBUTION]
        if others:
            taken[name] = ", ".join(sorted(set(others)))
    return taken


def shadowed(directory: Path, taken: dict[str, str]) -> list[str]:
    names = importable_names(directory) - {"__main__", "__init__"}
    return sorted(f"{directory}/{name}: shadows `import {name}` ({taken[name]})" for name in names if name in taken)


def engine_search_dirs() -> list[Path]:
    """The program directory the language host and the provider host put first, and every directory of this
    repository on the interpreter's own sys.path (the editable install), asked of a fresh interpreter."""
    fresh = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], cwd="/",
                           capture_output=True, text=True, check=True)
    entries = [Path(entry) for entry in json.loads(fresh.stdout) if entry]
    directories = [entry.resolve() for entry in entries if entry.is_absolute() and entry.is_dir()]  # not path hooks
    environment = Path(sys.prefix).resolve()  # .venv/ lies in the repository; its site-packages are the dependencies
    in_repository = [path for path in directories if (path == PROJECT_ROOT or PROJECT_ROOT in path.parents)
                     and environment not in (path, *path.parents)]
    return [Project.load().main, *in_repository]


def our_top_level_names() -> set[str]:
    """What the editable install maps by name (contract, infra, training, ...), wherever sys.path points."""
    return {name for name, distributions in importlib.metadata.packages_distributions().items()
            if OUR_DISTRIBUTION in (dist.lower() for dist in distributions)}


def test_no_package_of_ours_shadows_a_dependency_or_the_standard_library():
    taken = taken_names()
    assert {"replicate", "docker", "wandb", "pulumi", "json"} <= set(taken)  # the check sees them
    assert {"infra", "contract", "cloudapi"} <= our_top_level_names()
    problems = [problem for directory in engine_search_dirs() for problem in shadowed(directory, taken)]
    problems += [f"the installed package {name}: shadows `import {name}` ({taken[name]})"
                 for name in sorted(our_top_level_names()) if name in taken]
    assert problems == [], "rename these (the engine imports them instead of the dependency):\n" + "\n".join(problems)


def test_the_check_catches_a_shadowing_package(tmp_path):
    (tmp_path / "replicate").mkdir()
    (tmp_path / "replicate" / "client.py").write_text("import replicate\n")
    (tmp_path / "docker.py").write_text("")
    (tmp_path / "fine_name").mkdir()
    problems = shadowed(tmp_path, taken_names())
    assert [problem.split(":")[0] for problem in problems] == [f"{tmp_path}/docker", f"{tmp_path}/replicate"]
