"""Entry point: python -m hiermt.main --config=configs/base.py:STAGE[,options] --workdir=DIR.

STAGE is encoder | onset_pitch | velocity | offset | flatten; any config field can
be overridden with --config.KEY=VALUE (see configs/base.py for the fields).
The command re-runs itself under tcmalloc when it is installed (hiermt/allocator.py;
HIERMT_TCMALLOC=0 keeps the system allocator).

A stage already trained to `train.steps` is not touched again. A finished run
prints where its checkpoints are and the command to run next: the next stage's
training, or after the last stage transcription and evaluation.

Exit status: 0 when the stage is trained to `train.steps`; 2 for a --config.KEY
that names no config field; 75 (`train.PREEMPTED_EXIT_CODE`, EX_TEMPFAIL) when a
SIGTERM stopped it after every process saved a checkpoint: run the same command
again to resume.
"""

if __name__ == "__main__":
  # First, so the heavy imports below happen only in the process that stays.
  from hiermt import allocator
  allocator.use_tcmalloc()

import difflib
import json
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from hiermt import allocator
from hiermt import checkpoint
from hiermt import command_logging
from hiermt import next_steps
from hiermt import train
from hiermt import validation
from hiermt.data import pipeline
from hiermt.data import prepare
from hiermt.models import transcriber

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and stage, e.g. configs/base.py:velocity[,encoder=hppnet][,size=tiny][,runlocal].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; each stage writes WORKDIR/STAGE/.")
flags.mark_flags_as_required(["config", "workdir"])


def _unknown_key(argv):
  """The error line for the first --config.KEY of `argv` that names no field of its config, or None."""
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not given:
    return None
  try:
    config = flags.FLAGS[_CONFIG.name].parser.parse(given[-1])
  except Exception:  # pylint: disable=broad-except  (the config itself is broken: absl reports that)
    return None
  for arg in argv:
    match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    node, path = config, []
    for part in match.group(1).split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"--config.{match.group(1)}: {'.'.join(path)} is a value, not a group of fields"
      if part not in node:
        valid = sorted(node.keys())
        close = difflib.get_close_matches(part, valid, n=1)
        hint = f" (did you mean {'.'.join(path + close)}?)" if close else ""
        where = f" of {'.'.join(path)}" if path else ""
        return (f"unknown config key {'.'.join(path + [part])!r}{hint}; valid keys{where}: "
                f"{', '.join(valid)}")
      node, path = node[part], path + [part]
  return None


def _parse_flags(argv):
  """absl's flag parsing, with a misspelt stage, option or --config.KEY reported as one line naming
  the valid ones (absl and ml_collections would print a long traceback)."""
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if given:
    try:
      flags.FLAGS[_CONFIG.name].parser.parse(given[-1])
    except ValueError as e:  # configs/base.py names a misspelt stage or option and the valid ones
      # ml_collections wraps get_config's error with its traceback as text: keep the last line.
      last = str(e).strip().splitlines()[-1]
      print(f"hiermt.main: error: {last.removeprefix('ValueError: ')}", file=sys.stderr)
      sys.exit(2)
    except Exception:  # pylint: disable=broad-except  (a missing or broken file: absl reports it below)
      pass
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = _unknown_key(argv)
    if message is None:
      raise
    print(f"hiermt.main: error: {message}", file=sys.stderr)
    sys.exit(2)


def _corpus_dir(config):
  """The MAESTRO-layout folder the run trained on (the generated corpus when `data.data_dir` is empty).

  Call on every process: a multi-process run's first look at the store is a barrier.
  """
  if config.data.data_dir:
    return os.path.abspath(os.path.expanduser(config.data.data_dir))
  with open(os.path.join(pipeline.prepared_dir(config), prepare.INDEX_NAME), encoding="utf-8") as f:
    return json.load(f)["data_dir"]


def _where_and_next(config, workdir):
  """Lines saying where the stage's checkpoints are and what to run next."""
  directory = checkpoint.stage_dir(workdir, config.stage)
  choice = checkpoint.choose(directory, "best")
  if choice.kind == "best":
    best = f"best step {choice.step}, validation {validation.score_key(config.stage)} {choice.score:.4f}"
  else:
    best = "no best: no checkpoint was scored by validation"
  last = config.stage == next_steps.STAGE_ORDER[-1]
  commands = next_steps.commands(flags.FLAGS[_CONFIG.name].config_filename,
                                 flags.FLAGS[_CONFIG.name].override_values,
                                 workdir, _corpus_dir(config) if last else "")
  lines = [f"{config.stage}: checkpoints in {os.path.join(directory, 'checkpoints')} "
           f"(latest step {choice.latest}; {best})",
           "all stages are trained; next:" if last else "next:"]
  return lines + [f"  {c}" for c in commands]


def _train(config, workdir):
  """`train.run`, exiting with the requeue status when preempted and with one line when an
  earlier stage is untrained or the corpus is missing.

  Those errors are hiermt's own FileNotFoundErrors, raised with a message that says what
  to do and no file name; one the system raises (`filename` set, e.g. a file vanishing
  mid-run) keeps its traceback.
  """
  try:
    train.run(config, workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except FileNotFoundError as e:
    if e.filename is not None:
      raise
    print(f"hiermt.main: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  command_logging.hiermt_info_only()
  logging.info("host allocator: %s", "tcmalloc" if allocator.tcmalloc_loaded() else
               f"system (install libtcmalloc-minimal4 for faster CPU steps, or {allocator.ENV_SWITCH}=0 is set)")
  config = _CONFIG.value
  try:
    # Config values the model refuses (an option for the other encoder, a dtype): one line, not a traceback.
    transcriber.build_model(config)
  except ValueError as e:
    print(f"hiermt.main: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  _train(config, _WORKDIR.value)
  lines = _where_and_next(config, _WORKDIR.value)
  if jax.process_index() == 0:
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
