"""Exception types. Every error names the offending file/tensor/key and what was expected."""


class TaskvecError(Exception):
    """Base class of taskvec's errors."""


class ShapeMismatchError(TaskvecError, ValueError):
    """Two tensors that must agree (same name in two checkpoints) have different shapes."""


class BaseMismatchError(TaskvecError, ValueError):
    """A task vector applied to (or combined with) a model of another base."""


class DataError(TaskvecError, ValueError):
    """Bad task data: missing columns, empty or single-class splits, unknown labels."""


class OutputExistsError(TaskvecError, FileExistsError):
    """The output path exists and overwrite was not requested."""
