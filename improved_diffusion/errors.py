"""The one family of errors a user can cause.

Every problem a user can fix (a bad flag, a missing or unreadable path, a corrupt file, an
impossible sampling scheme) is raised as a subclass of `UserError` whose message is one
sentence naming the problem. Scripts turn any `UserError` into that sentence on stderr and
exit code 2 (see `cli.run`); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; str(e) is one sentence naming it."""


class ConfigError(UserError, ValueError):
    """A flag value, or a combination of flags, that cannot work."""


class CheckpointError(UserError):
    """A checkpoint or run directory that is missing, unreadable or not what it claims to be."""


class DatasetError(UserError):
    """Data the user asked for is missing, unreadable or unsuitable; names the dataset or file."""


class PlanError(UserError, ValueError):
    """A frame plan cannot be built or continued with these parameters."""


class ScheduleError(UserError, ValueError):
    """Impossible within-stage noise-schedule parameters."""


class EvalError(UserError):
    """A results folder that cannot be evaluated."""


class TrainingError(UserError):
    """Training cannot go on (e.g. too many non-finite losses in a row); the last good checkpoint is kept."""
