"""The commands' log filter: hiermt's INFO lines pass, libraries' INFO lines do not."""

import logging
import os

from hiermt import command_logging
from hiermt import transcribe


def _record(pathname, level):
  return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_hiermt_info_passes_and_library_info_is_dropped():
  keep = command_logging.HiermtInfo()
  assert keep.filter(_record(transcribe.__file__, logging.INFO))
  library = os.path.join(os.path.dirname(os.__file__), "site-packages", "orbax", "checkpoint_manager.py")
  assert not keep.filter(_record(library, logging.INFO))
  assert keep.filter(_record(library, logging.WARNING))


def test_a_clone_named_hiermt_does_not_let_its_libraries_through():
  # `git clone .../hiermt` puts the virtual environment, and every library, under .../hiermt/.venv/.
  keep = command_logging.HiermtInfo()
  venv_library = "/home/user/hiermt/.venv/lib/python3.12/site-packages/jax/_src/xla_bridge.py"
  assert not keep.filter(_record(venv_library, logging.INFO))
