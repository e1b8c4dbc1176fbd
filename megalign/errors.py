"""One error type for problems the user can fix (bad config, bad input, a checkpoint that does not fit): its
message is one line that says what is wrong and what would work. Command lines print it without a traceback."""


class MegalignError(Exception):
    pass


class OptionError(MegalignError):
    """A bad value of a library function's option, named as the library calls it (e.g. `seq_length`). A command
    line names it by its flag instead (megalign/cli.py maps option names to flags); the library never does."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.detail = message
