"""What hiermt's commands log: their own INFO lines, and only warnings or worse from libraries.

JAX probes for TPU and proxy backends at start-up and Orbax narrates every checkpoint it opens,
both at INFO; a user running `hiermt.transcribe` wants the progress bars and hiermt's own lines.
Grain's worker processes hand batches over in shared memory, and when a training run ends
Python's resource tracker (a process of its own) warns that it frees the last blocks.
"""

import logging as std_logging
import os

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class HiermtInfo(std_logging.Filter):
  """Passes records at WARNING and above, and INFO records logged from hiermt's own modules.

  The test is the logging call's file being inside this package's folder (not a "/hiermt/"
  substring: a clone named hiermt holds its `.venv`, and so every library, under such a path).
  """

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


# The resource tracker's "There appear to be N leaked shared_memory objects to clean up at shutdown":
# it then unlinks them, so nothing is lost. It runs as a separate interpreter, started on the first
# shared-memory block, which takes its warning filters from PYTHONWARNINGS.
RESOURCE_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker():
  """Adds `RESOURCE_TRACKER_FILTER` to PYTHONWARNINGS for the processes this one starts from now on."""
  current = os.environ.get("PYTHONWARNINGS", "")
  if RESOURCE_TRACKER_FILTER not in current.split(","):
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, RESOURCE_TRACKER_FILTER]))


def hiermt_info_only():
  """Logs INFO from hiermt and WARNING and above from everything else, through absl's handler, and
  silences the resource tracker's shutdown warning (`quiet_resource_tracker`)."""
  quiet_resource_tracker()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, HiermtInfo) for f in handler.filters):
    handler.addFilter(HiermtInfo())
