"""The commands' log filter: hiermt's INFO lines pass, libraries' INFO lines do not; third-party noise is silenced."""

import logging
import os
import subprocess
import sys

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


_LEAK_SHARED_MEMORY = ("from multiprocessing import shared_memory\n"
                       "block = shared_memory.SharedMemory(create=True, size=64)\n"
                       "block.close()  # never unlinked: the resource tracker frees it at exit, and says so\n")


def test_the_resource_trackers_shutdown_warning_is_silenced(monkeypatch):
  monkeypatch.delenv("PYTHONWARNINGS", raising=False)
  loud = subprocess.run([sys.executable, "-c", _LEAK_SHARED_MEMORY], capture_output=True, text=True, timeout=60)
  assert "leaked shared_memory" in loud.stderr  # the noise, without the filter
  monkeypatch.setenv("PYTHONWARNINGS", "default::DeprecationWarning")
  command_logging.hiermt_info_only()
  command_logging.hiermt_info_only()  # added once
  assert os.environ["PYTHONWARNINGS"] == "default::DeprecationWarning," + command_logging.RESOURCE_TRACKER_FILTER
  quiet = subprocess.run([sys.executable, "-c", _LEAK_SHARED_MEMORY], capture_output=True, text=True, timeout=60)
  assert quiet.returncode == 0 and "leaked" not in quiet.stderr, quiet.stderr
