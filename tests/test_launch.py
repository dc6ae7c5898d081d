"""launch/*.sh on preemption (exit status 75), with stand-ins for the trainer, srun and scontrol:
the recipe stops at the preempted stage and resumes it when re-run; the SLURM script requeues."""
import os
import pathlib
import subprocess

from hiermt import train

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A stand-in for `python -m hiermt.main`: logs its stage; the stage named in $PREEMPT_STAGE is
# preempted (exit 75) the first time it runs, as a trainer stopped by SIGTERM would be.
FAKE_TRAINER = """#!/usr/bin/env bash
stage=$(printf '%s\\n' "$@" | sed -n 's/^--config=configs\\/base.py:\\([a-z_]*\\).*/\\1/p')
echo "$stage" >> "$LOG"
if [ "$stage" = "${PREEMPT_STAGE:-}" ] && [ ! -e "$LOG.preempted" ]; then touch "$LOG.preempted"; exit 75; fi
exit 0
"""


def _script(path, text):
  path.write_text(text)
  path.chmod(0o755)
  return path


def _stages(log):
  return log.read_text().split()


def test_recipe_stops_at_a_preempted_stage_and_resumes_it(tmp_path):
  assert train.PREEMPTED_EXIT_CODE == 75
  log = tmp_path / "log"
  env = dict(os.environ, PYTHON=str(_script(tmp_path / "python", FAKE_TRAINER)), LOG=str(log),
             PREEMPT_STAGE="velocity")
  recipe = ["bash", "launch/paper_recipe.sh", "/data", str(tmp_path / "run")]
  first = subprocess.run(recipe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert first.returncode == 75 and "run this command again" in first.stderr
  assert _stages(log) == ["encoder", "onset_pitch", "velocity"]  # offset never ran on a half-trained velocity
  second = subprocess.run(recipe, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert second.returncode == 0, second.stderr
  assert _stages(log)[3:] == ["encoder", "onset_pitch", "velocity", "offset", "flatten"]


def _sbatch(tmp_path, srun_status, *args):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  # srun runs the command it is given (one task here), scontrol records what it was asked.
  _script(bin_dir / "srun", '#!/usr/bin/env bash\necho "srun $*" >> "$LOG"\n'
          'while [[ "$1" == --* ]]; do shift; done\n"$@"\n')
  _script(bin_dir / "scontrol", '#!/usr/bin/env bash\necho "scontrol $*" >> "$LOG"\n')
  trainer = _script(tmp_path / "python", f'#!/usr/bin/env bash\necho "trainer $*" >> "$LOG"\nexit {srun_status}\n')
  log = tmp_path / "log"
  log.write_text("")
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(trainer), LOG=str(log),
             SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT))
  proc = subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=60)
  return proc, log.read_text().splitlines()


def test_slurm_script_requeues_a_preempted_job_and_nothing_else(tmp_path):
  header = (ROOT / "launch" / "slurm.sbatch").read_text()
  assert "#SBATCH --requeue" in header and "#SBATCH --signal=TERM@" in header
  proc, log = _sbatch(tmp_path, 75, "--config=configs/base.py:velocity", "--workdir=/w")
  assert proc.returncode == 75
  assert log[0].startswith("srun --wait=") and log[1].endswith("-m hiermt.main --config=configs/base.py:velocity "
                                                               "--workdir=/w")
  assert log[2] == "scontrol requeue 4242"
  proc, log = _sbatch(tmp_path, 1, "--config=configs/base.py:velocity", "--workdir=/w")
  assert proc.returncode == 1 and not any(line.startswith("scontrol") for line in log)
  # The whole recipe in one allocation: each stage through srun; preempted at the first one here.
  proc, log = _sbatch(tmp_path, 75, "--recipe", "/data", "/w")
  assert proc.returncode == 75 and "--config=configs/base.py:encoder" in log[1]
  assert log[-1] == "scontrol requeue 4242" and len(log) == 3
