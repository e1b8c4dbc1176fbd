"""One error type for problems the user can fix (bad config, bad input, a checkpoint that does not fit): its
message is one line that says what is wrong and what would work. Command lines print it without a traceback."""

from __future__ import annotations


class MegalignError(Exception):
    retryable = False  # the same command can succeed once the cause is fixed outside megalign (not in its input)


class StorageError(MegalignError):
    """The file system failed the run (a full disk, a lost mount): worth retrying once fixed."""

    retryable = True


class OptionError(MegalignError):
    """A bad value of a library option, named as the library calls it (e.g. `seq_length`). The message may name
    other options as `{name}` with `mentions=("name",)` (option None: a message that only mentions options). The library never names command-line flags: a command
    line renders the names as its flags (megalign/cli.py), a library caller sees the option names."""

    def __init__(self, option: str | None, message: str, mentions: tuple[str, ...] = ()):
        self.option, self.message, self.mentions = option, message, mentions
        super().__init__(self.render(lambda name: name))

    def render(self, name_of) -> str:
        text = self.message
        for other in self.mentions:
            text = text.replace("{" + other + "}", name_of(other))
        return text if self.option is None else f"{name_of(self.option)} {text}"
