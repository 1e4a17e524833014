"""Typed errors: library code raises these; only `ensc.cli` turns them into one-line messages."""


class EnscError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""


class DataError(EnscError):
    """A dataset is missing, malformed or asked for in a way that cannot work."""


class CheckpointError(EnscError):
    """A checkpoint or teacher folder cannot be read as asked."""


class ConfigError(EnscError):
    """Options that contradict each other or the files they point at."""


class DivergenceError(EnscError, FloatingPointError):
    """Training diverged (the loss became NaN or infinite); a FloatingPointError too, as before."""


class ExportError(EnscError):
    """The model could not be exported, converted or written as asked."""


class ExportParityError(ExportError):
    """An exported graph does not reproduce PyTorch within the tolerance; ``result`` has the details."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class WriteError(EnscError, OSError):
    """A file could not be written (disk full, ...); an OSError too, so ``except OSError`` still catches it."""


class MissingExtraError(EnscError):
    """An optional dependency (a pip extra such as ``ensc[plot]``) is not installed."""


class CompressParityError(EnscError):
    """The averaged network lost more than allowed against its BatchEnsemble, or the fold was not exact."""


def one_line(err: BaseException, *, join: bool = False) -> str:
    """``err``'s message as one line: its first line, or with ``join`` all its lines joined by spaces.

    ``join`` also collapses runs of whitespace. An empty message gives the exception's class name.
    """
    text = str(err).strip()
    if join:
        text = " ".join(text.split())
    elif text:
        text = text.splitlines()[0]
    return text or type(err).__name__


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``"1 member"``, ``"2 members"``: ``n`` and the noun in the right number (``nouns``: an irregular plural)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def signed(value: float, digits: int = 2) -> str:
    """``"+0.25"``, ``"-1.50"``, and ``"+0.00"`` for whatever rounds to zero (never ``"-0.00"``)."""
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text
