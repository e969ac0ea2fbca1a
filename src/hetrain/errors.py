"""One exception type per part; the CLI turns any of them into one line and exit code 2."""


class HetrainError(Exception):
    """Base for errors a user can act on (bad input, infeasible request)."""


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


class RuntimeFailure(HetrainError):
    """A worker died, hung or reported an error. `lost_devices`: ids of the devices presumed
    lost (died without a report, or hung), for re-planning; empty when no device is to blame."""

    def __init__(self, message: str, lost_devices: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.lost_devices = tuple(lost_devices)


class CheckpointError(HetrainError):
    pass
