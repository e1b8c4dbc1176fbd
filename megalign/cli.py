"""What every command line of megalign shares: an argument parser whose errors are one line, and a call that turns
a MegalignError into `error: ...` on stderr and exit status 2, naming options by their flags."""

from __future__ import annotations

import argparse
import sys

from megalign.errors import MegalignError, OptionError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (the full usage is one --help away)."""

    def error(self, message):
        fail(f"{message} (see {self.prog} --help)")

    def flag(self, option: str) -> str:
        """The flag of the argument whose destination is `option` (seq_length -> --seq-length), or `option`."""
        for parser in [self, *self._subparsers_of()]:
            for action in parser._actions:
                if action.dest == option and action.option_strings:
                    return max(action.option_strings, key=len)
        return option

    def _subparsers_of(self) -> list[argparse.ArgumentParser]:
        found = []
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
        return found

    def call(self, function, *args, **kwargs):
        """function(*args, **kwargs); a MegalignError ends the process with one line and status 2."""
        try:
            return function(*args, **kwargs)
        except OptionError as e:
            fail(e.render(self.flag))
        except MegalignError as e:
            fail(str(e), 1 if e.retryable else 2)


def fail(message: str, status: int = 2) -> None:
    """One line on stderr, then exit: 2 for what the input must change, 1 for a failure worth retrying."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
