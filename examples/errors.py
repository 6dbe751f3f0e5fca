"""The examples' own exception types and the exit status of each.

A :class:`UsageError` is something the person running the example can fix (a
flag, a missing file, a checkpoint from other settings): the command line
prints its message in one line and exits with status 2. Anything else is a
bug and keeps its traceback. This module imports nothing, so that ``data.py``
(and through it ``predict.py``) can use it without importing Flax or jbn.
"""

EXIT_USAGE = 2  # a UsageError (argparse uses 2 for its own errors too)
EXIT_STOPPED = 3  # TrainingStopped: non-finite values, nothing exported
EXIT_LOST_PROCESS = 4  # another process of a multi-process run died


class UsageError(Exception):
  """A problem with what was asked for, not with the code: printed as one
  line (``error: ...``), exit status 2."""


class TrainingStopped(Exception):
  """Training stopped on purpose: a step produced a non-finite loss or
  state. The last good checkpoint is kept and nothing is exported; exit
  status 3."""
