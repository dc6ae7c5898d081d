"""Writing files so that readers see the old file or the whole new one, never a partial one."""

import contextlib
import os


@contextlib.contextmanager
def atomic_output(path):
  """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds.

  The folder is created if needed. An interrupted or failing writer leaves
  nothing behind: neither a half-written file under the final name nor the
  temporary file.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
