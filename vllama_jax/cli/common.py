"""What every `vllama-jax` subcommand shares: the one-line error contract, library quieting, `--debug`,
simulated devices and the mesh flag.

Contract: a command's output goes to stdout, notes and progress to stderr; a failure on bad input ends with ONE
line ``error: <what and why>`` on stderr and a non-zero status (the error class's `exit_status`: 2 for a bad flag
or config value, 1 for a file or model that cannot be used; 130 when interrupted), never a traceback (``--debug``
shows it and the libraries' warnings).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import warnings
from typing import Any, Callable, Iterator

import jax

from ..errors import UsageError, VllamaError, first_line
from ..runtime import simulate_cpu_devices
from ..sharding import MeshSpecError, make_mesh

PROG = "vllama-jax"

Command = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (not the usage block), as every other failure of the command line."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_args(p: argparse.ArgumentParser, *, devices: bool = False) -> None:
    """--debug on every subcommand; --fake-devices on those that build a device mesh."""
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    if devices:
        p.add_argument("--fake-devices", type=int, default=None, metavar="N",
                       help="simulate N CPU devices (try a pod's mesh on one machine)")


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mesh_from_flag(spec: str | None) -> Any:
    """The device mesh of a --mesh flag (None: one device); a bad spec is a usage error naming the flag."""
    if not spec:
        return None
    try:
        return make_mesh(spec)
    except MeshSpecError as e:
        hint = ""
        if jax.default_backend() == "cpu" and "available" in str(e):
            hint = " (on CPU, simulate devices with --fake-devices N)"
        raise UsageError(f"--mesh: {e}{hint}") from None


@contextlib.contextmanager
def cli_environment(debug: bool) -> Iterator[None]:
    """For the duration of a command: SIGTERM (a killed job) unwinds like Ctrl-C, and library warnings and absl log
    lines do not break the one-line contract. Restored afterwards (commands also run in-process, e.g. in tests)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ log lines
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    loggers = {name: logging.getLogger(name) for name in ("absl", "jax", "transformers")}
    levels = {name: lg.level for name, lg in loggers.items()}
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    except (ValueError, OSError):  # not the main thread
        old_term = None
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.simplefilter("ignore")
                for lg in loggers.values():
                    lg.setLevel(logging.ERROR)
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def error_line(e: BaseException) -> str:
    """The one line a failure is reported with."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, (VllamaError, OSError)):
        return first_line(e)
    return f"unexpected {type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)"


def run_command(command: Command, args: argparse.Namespace, *, input_error_status: int | None = None,
                interrupted: str = "interrupted") -> int:
    """Run a parsed subcommand under the contract. `input_error_status` replaces the error classes' own status for
    a command whose scripts rely on one code for every bad input (training: 2)."""
    debug = bool(getattr(args, "debug", False))
    try:
        with cli_environment(debug):
            if getattr(args, "fake_devices", None) is not None:
                if args.fake_devices < 1:
                    raise UsageError(f"--fake-devices: must be >= 1, got {args.fake_devices}")
                simulate_cpu_devices(args.fake_devices)
                if jax.device_count() != args.fake_devices and not getattr(args, "coordinator", None):
                    raise UsageError(f"--fake-devices: JAX already started with {jax.device_count()} devices")
            return int(command(args) or 0)
    except KeyboardInterrupt:
        print(f"error: {interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `vllama-jax chat ... | head -1`
        return 0
    except Exception as e:  # noqa: BLE001 - the contract is one line per failure
        if debug:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        if isinstance(e, VllamaError):
            return input_error_status if input_error_status is not None and e.exit_status == 1 else e.exit_status
        if isinstance(e, (OSError, ValueError)) and input_error_status is not None:
            return input_error_status
        return 1


__all__ = ["PROG", "Parser", "UsageError", "add_common_args", "cli_environment", "error_line", "info",
           "mesh_from_flag", "run_command"]
