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
    """A worker died, hung or reported an error."""


class CheckpointError(HetrainError):
    pass
