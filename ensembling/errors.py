"""The errors a user can act on. Each message says what is wrong and what to do;
the command line prints it as one line and exits with 2 (1 for `TrainingFailed`)."""


class UsageError(ValueError):
    """A flag or file the user chose cannot work; the message says what to do instead."""


class DataError(ValueError):
    """The data source is missing, malformed or unsafe; the message says what to do."""


class ExportError(ValueError):
    """The export or the prediction cannot be done; the message says why and what to do."""


class TrainingFailed(Exception):
    """Training failed: a member's process ended with an error (its own lines, relayed
    above, say which), or a distilled student's loss became NaN."""
