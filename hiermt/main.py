"""Entry point: python -m hiermt.main --config=configs/base.py:STAGE[,options] --workdir=DIR.

STAGE is encoder | onset_pitch | velocity | offset | flatten; any config field can
be overridden with --config.KEY=VALUE (see configs/base.py for the fields).
The command re-runs itself under tcmalloc when it is installed (hiermt/allocator.py;
HIERMT_TCMALLOC=0 keeps the system allocator).

Exit status: 0 when the stage is trained to `train.steps`; 75
(`train.PREEMPTED_EXIT_CODE`, EX_TEMPFAIL) when a SIGTERM stopped it after every
process saved a checkpoint: run the same command again to resume.
"""

if __name__ == "__main__":
  # First, so the heavy imports below happen only in the process that stays.
  from hiermt import allocator
  allocator.use_tcmalloc()

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hiermt import allocator
from hiermt import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and stage, e.g. configs/base.py:velocity[,encoder=hppnet][,size=tiny][,runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; each stage writes WORKDIR/STAGE/.")
flags.mark_flags_as_required(["config", "workdir"])


class _HiermtInfo(std_logging.Filter):
  """Keeps INFO lines from hiermt itself; libraries (Orbax, Grain) only warn and above."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/hiermt/" in record.pathname.replace("\\", "/")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_HiermtInfo())
  logging.info("host allocator: %s", "tcmalloc" if allocator.tcmalloc_loaded() else
               f"system (install libtcmalloc-minimal4 for faster CPU steps, or {allocator.ENV_SWITCH}=0 is set)")
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(train.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main)
