"""The one exception type of the data layer."""


class DataError(ValueError):
  """A dataset (or an example in it) is unusable.

  The message starts with the file and, where the format has them, the line or
  row, so that a bad example in a 100k-line file can be found at once:
  `prefs.jsonl, line 17: field 'chosen' must be a string, got int`.

  Attributes:
    path: the file or directory, or None for data that did not come from a file.
    location: e.g. "line 17" (1-based, line formats) or "row 3" (0-based, as in
      `dataset[3]` for parquet and `datasets` directories), or None.
  """

  def __init__(self, message: str, path: str | None = None, location: str | None = None):
    self.path = path
    self.location = location
    prefix = ", ".join(str(part) for part in (path, location) if part is not None)
    super().__init__(f"{prefix}: {message}" if prefix else message)
