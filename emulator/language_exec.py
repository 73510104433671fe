"""What Pulumi's Python language host runs for `pulumi up`: its `pulumi-language-python-exec` script, our copy.

emulator/language_host.py copies this file alone into a temporary directory and runs it there as a script, as
the CLI runs the one it installs in ~/.pulumi/bin: so `sys.path[0]` is a directory that holds no Python package,
never this repository's emulator/. The script takes the arguments the language host gives it (--monitor, --engine,
--project, --root_directory, --stack, --pwd, --dry_run, --parallel, --organization, then the program, "."),
reads the stack's configuration from PULUMI_CONFIG / PULUMI_CONFIG_SECRET_KEYS, connects the SDK to the engine,
changes into --pwd and starts the program with `runpy.run_path(".")` inside the SDK's stack, which puts "." (the
program directory) first on `sys.path` while the program runs. An error is reported to the engine's log and
the exit status is 1, as the real script does.
"""

import argparse
import asyncio
import logging
import os
import runpy
import sys
import traceback

import pulumi
import pulumi.runtime


def main() -> int:
    parser = argparse.ArgumentParser(description="Execute a Pulumi Python program")
    for option in ("project", "root_directory", "stack", "parallel", "dry_run", "pwd", "monitor", "engine",
                   "tracing", "organization"):
        parser.add_argument(f"--{option}")
    parser.add_argument("PROGRAM")
    parser.add_argument("ARGS", nargs="*")
    args = parser.parse_args()

    pulumi.runtime.set_all_config(pulumi.runtime.get_config_env(), pulumi.runtime.get_config_secret_keys_env())
    pulumi.runtime.configure(pulumi.runtime.Settings(
        monitor=args.monitor,
        engine=args.engine,
        project=args.project,
        root_directory=args.root_directory,
        stack=args.stack,
        parallel=int(args.parallel) if args.parallel else None,
        dry_run=args.dry_run == "true",
        organization=args.organization,
    ))
    sys.argv = [args.PROGRAM, *args.ARGS]
    if args.pwd:
        os.chdir(args.pwd)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # unobserved futures of a failed program: not news
    succeeded = False

    def program() -> None:
        runpy.run_path(args.PROGRAM, run_name="__main__")

    try:
        loop.run_until_complete(pulumi.runtime.run_in_stack(program))
        succeeded = True
    except pulumi.RunError as error:
        pulumi.log.error(str(error))
    except Exception:  # the engine shows the traceback, as the CLI does
        pulumi.log.error("Program failed with an unhandled exception:\n" + traceback.format_exc())
    finally:
        loop.close()
        sys.stdout.flush()
        sys.stderr.flush()
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
