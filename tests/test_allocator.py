"""Entry points re-run themselves under tcmalloc (installed by install.sh) unless switched off."""

import os
import subprocess
import sys

from hiermt import allocator

_PROBE = "from hiermt import allocator; allocator.use_tcmalloc(); print(allocator.tcmalloc_loaded())"


def _run_probe(**env):
  environment = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_SWITCH)}
  environment.update(env)
  done = subprocess.run([sys.executable, "-c", _PROBE], env=environment, capture_output=True, text=True,
                        check=True)
  return done.stdout.strip()


def test_reexecutes_with_tcmalloc_loaded():
  assert _run_probe() == "True"


def test_switch_keeps_system_allocator():
  assert _run_probe(**{allocator.ENV_SWITCH: "0"}) == "False"
