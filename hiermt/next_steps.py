"""What to run after a stage: the next stage's training command, or transcription and evaluation after the last."""

import os
import shlex

# The recipe's order (README, launch/paper_recipe.sh): the encoder, the hierarchy's stages, the baseline.
STAGE_ORDER = ("encoder", "onset_pitch", "velocity", "offset", "flatten")


def commands(config_arg: str, overrides: dict, workdir: str, data_dir: str) -> list[str]:
  """The commands to run after the stage of `config_arg`.

  Args:
    config_arg: the --config value, e.g. "configs/base.py:velocity,size=tiny,runlocal".
    overrides: the --config.KEY=VALUE overrides of the run, {KEY: VALUE}; repeated for
      the next stage (data location, sizes and encoder source concern every stage).
    workdir: the run directory.
    data_dir: the MAESTRO-layout corpus the run trained on, for the evaluation command.

  Returns:
    The next stage's `python -m hiermt.main` command; after the last stage,
    `python -m hiermt.transcribe` and `python -m hiermt.evaluate` on the test split.
  """
  path, _, arg = config_arg.partition(":")
  stage, *options = arg.split(",")
  position = STAGE_ORDER.index(stage)
  if position + 1 < len(STAGE_ORDER):
    next_arg = ",".join([STAGE_ORDER[position + 1], *options])
    words = ["python", "-m", "hiermt.main", f"--config={path}:{next_arg}", f"--workdir={workdir}"]
    words += [f"--config.{key}={value}" for key, value in overrides.items()]
    return [shlex.join(words)]
  output_dir = os.path.join(workdir, "transcriptions")
  return [shlex.join(["python", "-m", "hiermt.transcribe", f"--workdir={workdir}", f"--output_dir={output_dir}"])
          + " AUDIO...",
          shlex.join(["python", "-m", "hiermt.evaluate", f"--workdir={workdir}", f"--data_dir={data_dir}",
                      "--split=test"])]
