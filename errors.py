"""Typed errors: library code raises these; only `ensc.cli` turns them into one-line messages."""


class EnscError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class DataError(EnscError):
    """A dataset is missing, malformed or asked for in a way that cannot work."""


class CheckpointError(EnscError):
    """A checkpoint or teacher folder cannot be read as asked."""


class ConfigError(EnscError):
    """Options that contradict each other or the files they point at."""
