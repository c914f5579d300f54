"""Data errors: always name the file, pattern or key involved."""


class DataError(ValueError):
  """Bad or missing data. The message names the file or pattern."""
