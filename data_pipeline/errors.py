"""What reaches the user as a single line (exit code 2), never a traceback: the error type the
command-line tools raise, and their argument parser."""
import argparse
import socket


class UserError(Exception):
    """A mistake in the command line or its inputs that the user can fix."""


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
