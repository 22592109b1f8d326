"""What reaches the user as a single line (exit code 2), never a traceback: the error type the
command-line tools raise, and their argument parser."""
import argparse


class UserError(Exception):
    """A mistake in the command line or its inputs that the user can fix."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
