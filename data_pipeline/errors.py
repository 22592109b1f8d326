"""What reaches the user as a single line (exit code 2), never a traceback: the one error type
the command-line tools raise and catch, their argument parser, and the wrapper of their main()."""
import argparse
import socket
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the command line or its inputs that the user can fix; str() is one line.
    The config, checkpoint and Inception-weights errors are kinds of it, so every CLI catches
    this one type (`run_cli`)."""


def run_cli(prog: str, work: Callable[[], int], interrupted: str = "interrupted") -> int:
    """A CLI's exit status: `work()`'s, or 2 with one line `PROG: error: ...` on a UserError, or
    130 with `PROG: interrupted` on Ctrl-C. `prog` "" leaves the prefix out (launch.py's lines)."""
    prefix = f"{prog}: " if prog else ""
    try:
        return work()
    except UserError as exc:
        print(f"{prefix}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}{interrupted}", file=sys.stderr)
        return 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_port_free(flag: str, port: int, host: str = "127.0.0.1") -> None:
    """A port a command will listen on: in range and free on `host`, checked before anything starts."""
    if not 1 <= port <= 65535:
        raise UserError(f"{flag}: got {port}, allowed: 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                            f"pick another port") from None
