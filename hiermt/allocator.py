"""Puts hiermt's command-line entry points under tcmalloc.

XLA:CPU allocates each step's temporaries (gigabytes at the paper's sizes)
through the process allocator and frees them at the end of the step. glibc
returns such large blocks to the kernel and page-faults them back in on the
next step; tcmalloc keeps them. On this project's 2-core CPU machine that
takes the `tiny` cross-attention decoder step (5 x 1024 tokens) from ~15.4 s to
~11.8 s. Accelerator runs gain less but lose nothing.

The allocator of a process is fixed when it starts, so `use_tcmalloc` starts
the same command again with the library in `LD_PRELOAD` (once: the new
process sees it there). `install.sh` installs Debian's `libtcmalloc-minimal4`.
"""

import ctypes.util
import os
import sys

# Set HIERMT_TCMALLOC=0 to keep the system allocator.
ENV_SWITCH = "HIERMT_TCMALLOC"
_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


def use_tcmalloc() -> None:
  """Re-executes the running command with tcmalloc preloaded, if it is installed and not already in use.

  Returns without doing anything when `HIERMT_TCMALLOC=0`, when `LD_PRELOAD`
  already names a tcmalloc, or when no tcmalloc library is installed (the
  command then runs with the system allocator, only slower on CPU).
  """
  preload = os.environ.get("LD_PRELOAD", "")
  if os.environ.get(ENV_SWITCH, "1") == "0" or "tcmalloc" in preload:
    return
  library = next(filter(None, map(ctypes.util.find_library, _LIBRARIES)), None)
  if library is None:
    return
  env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip())
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def tcmalloc_loaded() -> bool:
  """Whether tcmalloc is mapped into this process (False where /proc is missing)."""
  try:
    with open("/proc/self/maps") as maps:
      return any("tcmalloc" in line for line in maps)
  except OSError:
    return False
