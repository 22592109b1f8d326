"""What reaches the user as a single line (exit code 2), never a traceback: the one error type
the command-line tools raise and catch, their argument parser, and the wrapper of their main()."""
import argparse
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
