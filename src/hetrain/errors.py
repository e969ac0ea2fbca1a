"""One exception type per part; the CLI turns any of them into one line and its exit code:
2 for bad input (the default), 1 for a fault of the machine (a lost worker, a full disk)."""

# Every character str.splitlines() breaks at, written as its escape (`\n`, `\x1e`, `\u2028`).
_ESCAPE_BREAKS = {ord(c): c.encode("unicode_escape").decode()
                  for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class HetrainError(Exception):
    """Base for errors a user can act on (bad input, infeasible request)."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object):
        # One line, whatever the user's paths and values hold: line breaks escaped.
        if isinstance(message, str):
            message = message.translate(_ESCAPE_BREAKS)
        super().__init__(message, *args)


class ClusterError(HetrainError):
    pass


class ModelError(HetrainError):
    pass


class DataError(HetrainError):
    pass


class CostError(HetrainError):
    pass


class PlanError(HetrainError):
    pass


class PlannerError(HetrainError):
    pass


class SimError(HetrainError):
    pass


class ConfigError(HetrainError):
    """A training option out of range, an output path that cannot be written, or a run that
    cannot start here (too many local workers, a script without a `__main__` guard)."""


class RuntimeFailure(HetrainError):
    """A worker died, hung or reported an error. `lost_devices`: ids of the devices presumed
    lost (died without a report, or hung), for re-planning; empty when no device is to blame."""

    exit_code = 1

    def __init__(self, message: str, lost_devices: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.lost_devices = tuple(lost_devices)


class CheckpointError(HetrainError):
    pass
