"""From a fresh machine to trained models, transcriptions and a Table-I results table.

  python -m hiermt.quickstart [--workdir=runs/quickstart] [--minutes=20] [--encoder=hppnet|crnn]
                              [--steps=encoder=N,onset_pitch=N,...]

Renders a MAESTRO-layout corpus (plus its test split again with a timbre and
room that training never hears, CORPUS/heldout), trains the five stages
(encoder, onset_pitch, velocity, offset, flatten) at a CPU size, each under its
share of the `--minutes` wall-clock budget, then transcribes and scores the
test split with every layout (Roll / Flatten / Hierarchy) and prints the table.

Every step is an ordinary hiermt command, printed before it runs, so any of
them can be re-run by hand. Re-running the quickstart resumes: stages that
finished are skipped, an interrupted stage continues from its checkpoint, a
finished evaluation is only printed again.

A budget's step counts follow the machine's speed that hour. `--steps` trains
the stages it names for exactly that many steps instead (the others keep their
share of the budget): the steps line under a run's table, passed back, repeats
that run's training on a machine of any speed (training is deterministic; on
other hardware up to float summation order).

Presets (`--preset`): `cpu` (default) is the CPU recipe; `gpu` the same chain at
the published sizes (full-width encoder, `tiny` decoder) for one GPU; `smoke` runs
it with the seconds-long `runlocal` configs (what CI runs).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax

from hiermt import checkpoint
from hiermt import evaluate
from hiermt import train
from hiermt import transcribe
from hiermt.data import synth

STAGES = ("encoder", "onset_pitch", "velocity", "offset", "flatten")
_DONE_MARK = "quickstart.done"

# The paper's Table I on MAESTRO v3 test (On / On-Off / On-Off-Vel F1), for comparison only.
PAPER_RESULTS = {
    ("hppnet", "roll"): (0.971, 0.822, 0.810),
    ("hppnet", "flatten"): (0.950, 0.390, 0.382),
    ("hppnet", "hierarchy"): (0.971, 0.852, 0.832),
}


@dataclasses.dataclass(frozen=True)
class Preset:
  """What the quickstart trains: config options, overrides and how it spends its budget.

  Attributes:
    options: appended to `configs/base.py:STAGE,encoder=E` (size, runlocal, ...).
    overrides: --config.KEY=VALUE flags for every stage.
    stage_overrides: extra flags per stage.
    corpus_minutes: audio rendered for the corpus.
    shares: fraction of the training budget per stage (they sum to 1).
    encoder_overrides: further overrides per encoder name (its width; options only one encoder has).
    eval_flags: extra flags of `hiermt.evaluate`.
  """
  options: str
  overrides: dict
  stage_overrides: dict
  corpus_minutes: float
  shares: dict
  encoder_overrides: dict = dataclasses.field(default_factory=dict)
  eval_flags: tuple = ()


# The CPU recipe. Why these values: docs/design.md, "Quickstart and the CPU recipe". Measured
# on the 2-core machine (quiet): HPPNet at width 1/4 takes 2.1 s per step on 4 crops of 4 s and
# halves its frame loss within 125 steps; the CRNN at width 1/8 takes 0.9 s per step but had not
# left the predict-nothing phase after 360. An LM step of the micro decoder on 4 segments over
# the frozen HPPNet: 1.3-1.5 s. Step counts are left to the time budget; the state each budget
# stop saves is validated, so the best checkpoint is the newest whenever it scores highest.
# decode.min_pitch_prob 0.7 (0.5 for HPPNet with the note reader, below) was chosen on the
# validation split of the 90-minute recipe's run (Hierarchy On F1 0.259 at 0, 0.354 / 0.387 /
# 0.386 at 0.6 / 0.7 / 0.8; docs/design.md).
# decoder.rope_time 0.5: half the rotated features on time positions; onset_pitch at step 2341,
# 6 validation pieces: On F1 0.375 against 0.294 greedy, 0.448 against 0.412 at 0.7 (docs/design.md).
# train.ema_decay 0.99: validate, keep and transcribe with the parameters' moving average; three
# adjacent onset_pitch checkpoints of the 90-minute recipe scored 0.469 / 0.474 / 0.446 On F1 on the
# validation pieces, their mean 0.500 (docs/design.md).
# LM-stage validation on 6 pieces of up to 90 s (whole in the rendered corpus, 269 s of audio):
# 5-8 s a pass on the micro decoder; one 20 s piece kept worse checkpoints than the latest
# (docs/design.md).
PRESETS = {
    "cpu": Preset(
        options="size=micro",
        overrides={"train.steps": 1_000_000, "train.log_every": 10, "train.checkpoint_every": 100,
                   "train.eval_every": 100, "train.eval_on_preemption": True, "train.eval_batches": 1, "train.eval_pieces": 6,
                   "train.eval_seconds": 90.0, "train.batch_size": 4, "train.lr": 1e-3,
                   "train.warmup_steps": 20, "decoder.prefix_pool": 4, "decoder.time_init": True,
                   "decoder.rope_fraction": 0.5, "decoder.rope_time": 0.5, "decode.min_pitch_prob": 0.7,
                   "freeze_encoder": True, "train.ema_decay": 0.99,
                   "data.worker_count": 1, "data.max_tokens": 768},
        # The encoder is convolutional and recurrent: 4 s crops train it at 2.5x less cost per
        # crop than the 10 s segments the decoder needs.
        # The encoder validates on 3 pieces x 20 s: each pass also sweeps its Roll thresholds.
        stage_overrides={"encoder": {"data.segment_seconds": 4.0, "train.warmup_steps": 0, "train.eval_pieces": 3,
                                     "train.eval_seconds": 20.0},
                         "onset_pitch": {"data.max_tokens": 512},
                         "flatten": {"data.max_tokens": 1024}},
        corpus_minutes=45.0,
        # Every layout reads the encoder (HPPNet's decoder features are its rolls): half the time.
        # On the 90-minute recipe at ecf80ab its validation On-Off-Vel F1 still rose at its last
        # step (0.20 / 0.24 / 0.30 / 0.31 at steps 700 / 800 / 1000 / 1181). With the note reader's
        # roll priors the LM stages peak early: velocity near step 100 (validation 0.54, 0.44-0.49
        # after); offset with the end prior at weight 1 at step 50-100 (0.64 / 0.62, 0.59 at 171);
        # onset_pitch with the onset prior is flat from step ~400 (0.899, 0.905 at 741); at f1df183
        # it peaked at step 300 of 621 (validation On F1 0.895) while the encoder's On-Off-Vel was
        # still rising at its last step 1441: a tenth of the time moved from onset_pitch to the encoder.
        shares={"encoder": 0.6, "onset_pitch": 0.15, "velocity": 0.05, "offset": 0.1, "flatten": 0.1},
        # Full widths cost 256 (CRNN) and 134 (HPPNet) GFLOPs per 10 s forward: minutes per
        # step on two cores.
        # decoder.note_reader 16 (HPPNet only: its features are per key): on the 90-minute recipe's
        # frozen encoder, validation On F1 0.60 at onset_pitch step 300 (0.48 at best in 2221 steps
        # without it), offset On-Off F1 0.63 at step 400 (0.13); with the keys written taken out of
        # the note starts, On F1 0.68 at step 300. decode.min_pitch_prob 0.3: On F1 0.828 on the
        # whole validation pieces at onset_pitch step 561 (0.796 at 0.5, 0.688 at 0.7; docs/design.md).
        encoder_overrides={"crnn": {"encoder.width": 0.125},
                           "hppnet": {"encoder.width": 0.25, "decoder.note_reader": 16, "decoder.onset_prior": True,
                                      "decode.min_pitch_prob": 0.3}}),
    # One GPU: the encoder at its published width and recipe (10 s segments, batch 12), the
    # `tiny` decoder over the unpooled prefix. The LM stages keep the CPU recipe's lr and
    # time-aligned init: a short budget needs both. Validation is the teacher-forced loss only
    # (a decode pass compiles for tens of seconds, a large part of a short stage).
    "gpu": Preset(
        options="size=tiny",
        overrides={"train.steps": 1_000_000, "train.log_every": 50, "train.checkpoint_every": 500,
                   "train.eval_every": 1_000_000, "train.eval_on_preemption": True, "train.eval_batches": 2,
                   "train.eval_pieces": 0, "train.batch_size": 32, "train.lr": 1e-3, "train.warmup_steps": 50,
                   "decoder.time_init": True, "freeze_encoder": True, "data.worker_count": 8},
        stage_overrides={"encoder": {"train.batch_size": 12, "train.warmup_steps": 0}},
        corpus_minutes=45.0,
        shares={"encoder": 0.4, "onset_pitch": 0.25, "velocity": 0.1, "offset": 0.1, "flatten": 0.15}),
    "smoke": Preset(
        options="runlocal", overrides={"freeze_encoder": True}, stage_overrides={}, corpus_minutes=3.0,
        shares={s: 0.2 for s in STAGES}, eval_flags=("--max_pieces=1", "--plot_seconds=0")),
}
# Of the --minutes budget, what corpus rendering and evaluation are expected to take (measured
# for the cpu preset on the 2-core machine; the rest is split between the stages).
_OVERHEAD_SHARE = 0.2
# What an LM stage of the cpu preset runs past its budget: the validation at the stop (its decoding
# compiles on the first pass) and the save; 20-70 s on the 2-core machine (quickstart at b9050e1).
STAGE_TAIL_SECONDS = 60.0
# A stage's start-up (restoring the encoder, compiling the train step) takes 15-25 s there; the
# quickstart at b9050e1 stopped flatten with a budget of 0 s before it could save anything.
MIN_STAGE_SECONDS = 45.0
# The line under the results table that lists each stage's steps (`steps_line`; `parse_steps` reads it).
STEPS_LINE_PREFIX = "steps trained (checkpoint used):"


def stage_command(python, stage, encoder, preset, workdir, data_dir, steps=None):
  """The `hiermt.main` command that trains `stage` for the quickstart (`steps` steps, or until the
  budget stops it when None)."""
  overrides = dict(preset.overrides)
  overrides.update(preset.encoder_overrides.get(encoder, {}))
  overrides.update(preset.stage_overrides.get(stage, {}))
  overrides["data.data_dir"] = data_dir
  if steps is not None:
    overrides["train.steps"] = steps
  return ([python, "-m", "hiermt.main", f"--config=configs/base.py:{stage},encoder={encoder},{preset.options}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def _show(cmd):
  shown = [os.path.relpath(c) if c == sys.executable else c for c in cmd]
  print("$ " + " ".join(shown), flush=True)


def run_with_budget(cmd, seconds):
  """Runs `cmd`; after `seconds` (None: never) sends it SIGTERM (it saves a checkpoint and exits 75).

  Returns:
    (exit status, True when the budget stopped it).
  """
  _show(cmd)
  process = subprocess.Popen(cmd)
  try:
    process.wait(timeout=None if seconds is None else max(1.0, seconds))
    return process.returncode, False
  except subprocess.TimeoutExpired:
    print(f"quickstart: time budget of {seconds / 60:.1f} min reached; stopping at the next step "
          "(a checkpoint is saved)", flush=True)
    process.send_signal(signal.SIGTERM)
    return process.wait(), True
  except KeyboardInterrupt:
    process.send_signal(signal.SIGTERM)
    process.wait()
    raise


def stage_seconds(shares, stage, seconds_left):
  """`stage`'s part of the training time left: its share among itself and the stages after it.

  Each stage runs past its budget by its last validation and save (`STAGE_TAIL_SECONDS`), so that
  much is kept back for each stage from this one on; taking the time left each time makes the later
  stages absorb what a stage ran over beyond that. No stage gets less than `MIN_STAGE_SECONDS`:
  every layout needs a checkpoint of each of its stages.
  """
  later = STAGES[STAGES.index(stage):]
  split = max(0.0, seconds_left - STAGE_TAIL_SECONDS * len(later)) * shares[stage] / sum(shares[s] for s in later)
  return max(MIN_STAGE_SECONDS, split)


def train_stage(python, stage, encoder, preset, workdir, data_dir, seconds, steps=None):
  """Trains one stage within `seconds` (None: no budget, for `steps` steps) unless an earlier quickstart
  run finished it."""
  mark = os.path.join(workdir, stage, _DONE_MARK)
  if os.path.exists(mark):
    with open(mark) as f:
      print(f"quickstart: {stage} already trained ({f.read().strip()}); skipping", flush=True)
    return
  started = time.time()
  status, stopped = run_with_budget(stage_command(python, stage, encoder, preset, workdir, data_dir, steps), seconds)
  if status not in (0, train.PREEMPTED_EXIT_CODE) or (status == train.PREEMPTED_EXIT_CODE and not stopped):
    raise SystemExit(f"quickstart: training {stage} failed (exit status {status}); fix the error above "
                     "and run the quickstart again: it resumes from the last checkpoint")
  with open(mark, "w") as f:
    f.write(f"{'stopped by its time budget' if stopped else 'trained to train.steps'} "
            f"after {time.time() - started:.0f} s")


def parse_steps(text) -> dict[str, int]:
  """`--steps`: "encoder=4081,onset_pitch=831" -> {"encoder": 4081, "onset_pitch": 831}.

  Also takes the steps line a run prints under its table ("encoder 4081 (uses 3300), ...").

  Raises:
    ValueError: an unknown stage, a count that is not a positive integer, or a stage given twice.
  """
  steps = {}
  text = text.removeprefix(STEPS_LINE_PREFIX)
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, count = part.replace("=", " ", 1).partition(" ")
    count = count.split("(")[0].strip()
    if name not in STAGES:
      raise ValueError(f"--steps: unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f"--steps: {name} needs a positive whole number of steps, got {count!r}")
    if name in steps:
      raise ValueError(f"--steps: {name} is given twice")
    steps[name] = int(count)
  return steps


def count_params(workdir):
  """Parameters each layout transcribes with: {layout: count} (a shared encoder counted once)."""
  def sizes(stage):
    variables, _ = checkpoint.load_variables(checkpoint.stage_dir(workdir, stage), "")
    params = variables["params"]
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    encoder = sum(x.size for x in jax.tree_util.tree_leaves(params.get("encoder", {})))
    with open(os.path.join(checkpoint.stage_dir(workdir, stage), "config.json")) as f:
      frozen = json.load(f).get("freeze_encoder", False)
    return total, encoder, frozen

  counts = {}
  for layout, stages in transcribe.LAYOUTS.items():
    per_stage = [sizes(s) for s in stages]
    decoders = sum(total - encoder for total, encoder, _ in per_stage)
    shared = all(frozen for _, _, frozen in per_stage)
    encoders = per_stage[0][1] if shared else sum(encoder for _, encoder, _ in per_stage)
    counts[layout] = decoders + encoders
  return counts


def run_evaluation(python, workdir, data_dir, name, preset):
  """Scores the test split of `data_dir` with every layout into WORKDIR/eval/NAME (once)."""
  output_dir = os.path.join(workdir, "eval", name)
  report = os.path.join(output_dir, evaluate.METRICS_FILE)
  if not os.path.exists(report):
    cmd = [python, "-m", "hiermt.evaluate", f"--workdir={workdir}", f"--data_dir={data_dir}", "--split=test",
           f"--output_dir={output_dir}", *preset.eval_flags]
    _show(cmd)
    status = subprocess.run(cmd, check=False).returncode
    if status != 0:
      raise SystemExit(f"quickstart: evaluation on {data_dir} failed (exit status {status})")
  with open(report) as f:
    return json.load(f)["layouts"]


def results_table(encoder, params, seen, heldout):
  """Table I: one row per layout, params, then seen-timbre and held-out-timbre note F1s."""
  keys = ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1")
  headers = ["encoder", "layout", "params", "seen On", "On-Off", "On-Off-Vel", "held-out On", "On-Off",
             "On-Off-Vel", "paper (MAESTRO) On / On-Off / On-Off-Vel"]
  rows = []
  for layout in ("roll", "flatten", "hierarchy"):
    if layout not in seen:
      continue
    paper = PAPER_RESULTS.get(("hppnet", layout))
    rows.append([encoder, evaluate.DISPLAY_NAMES[layout], f"{params[layout] / 1e6:.2f} M"]
                + [f"{seen[layout]['mean'][k]:.3f}" for k in keys]
                + [f"{heldout[layout]['mean'][k]:.3f}" if layout in heldout else "-" for k in keys]
                + [" / ".join(f"{v:.3f}" for v in paper) + " (HPPNet)" if paper else "-"])
  widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
  return "\n".join([fmt(headers), "-" * len(fmt(headers))] + [fmt(r) for r in rows])


def steps_line(workdir) -> str:
  """Each stage's training steps and the step of the checkpoint transcription uses (its best by
  validation). Under a time budget the machine's speed decides the steps, and the steps the scores."""
  parts = []
  for stage in STAGES:
    choice = checkpoint.choose(checkpoint.stage_dir(workdir, stage), "best")
    if choice is not None:
      parts.append(f"{stage} {choice.latest} (uses {choice.step})")
  return f"{STEPS_LINE_PREFIX} " + ", ".join(parts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # the stage commands below log their own progress
  args = flags.FLAGS
  try:
    fixed_steps = parse_steps(args.steps)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  preset = PRESETS[args.preset]
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.abspath(args.data_dir or os.path.join(workdir, "corpus"))
  python = sys.executable
  os.makedirs(workdir, exist_ok=True)
  started = time.time()
  budget = args.minutes * 60.0

  print(f"quickstart: {args.minutes:g} min budget, encoder {args.encoder}, preset {args.preset}, "
        f"workdir {workdir}", flush=True)
  if not args.data_dir:
    minutes = preset.corpus_minutes if args.corpus_minutes is None else args.corpus_minutes
    corpus = [python, "-m", "hiermt.data.synth", f"--output_dir={data_dir}", f"--minutes={minutes:g}"]
    _show(corpus)
    subprocess.run(corpus, check=True)

  training_ends = started + budget * (1.0 - _OVERHEAD_SHARE)
  for stage in STAGES:
    # A stage with fixed steps runs to them; the others share what is left of the budget.
    seconds = None if stage in fixed_steps else stage_seconds(preset.shares, stage, training_ends - time.time())
    train_stage(python, stage, args.encoder, preset, workdir, data_dir, seconds, fixed_steps.get(stage))

  seen = run_evaluation(python, workdir, data_dir, "test", preset)
  heldout_dir = os.path.join(data_dir, synth.HELDOUT_DIR)
  heldout = run_evaluation(python, workdir, heldout_dir, "heldout", preset) if os.path.isdir(heldout_dir) else {}
  table = results_table(args.encoder, count_params(workdir), seen, heldout) + "\n\n" + steps_line(workdir)
  with open(os.path.join(workdir, "results.txt"), "w") as f:
    f.write(table + "\n")
  print("\n" + table)
  print(f"\nquickstart finished in {(time.time() - started) / 60:.1f} min. Checkpoints: {workdir}/STAGE; "
        f"reports: {workdir}/eval/{{test,heldout}}; this table: {workdir}/results.txt\n"
        "Transcribe your own recordings with the trained models (the best layout on the test split first):\n"
        + "\n".join(transcribe_commands(workdir, seen)))


def transcribe_commands(workdir, seen) -> list[str]:
  """One `transcribe` command per layout, the highest test On F1 first, each with its score.

  Args:
    workdir: the run directory.
    seen: layout -> `evaluate` summary ({"mean": {"onset_f1": ...}}); layouts not in it come last.
  """
  def onset_f1(layout):
    return seen[layout]["mean"]["onset_f1"] if layout in seen else -1.0

  commands = []
  for layout in sorted(transcribe.LAYOUTS, key=onset_f1, reverse=True):
    score = f"   # test On F1 {onset_f1(layout):.3f}" if layout in seen else ""
    commands.append(f"  .venv/bin/python -m hiermt.transcribe --workdir={workdir} --layout={layout} "
                    f"--output_dir=out_{layout} my_recording.wav{score}")
  return commands


def _define_flags():
  """Flags; defined only when run as a script, so importing this module claims no flag names."""
  flags.DEFINE_string("workdir", "runs/quickstart", "Where the corpus, checkpoints and reports go.")
  flags.DEFINE_float("minutes", 20.0, "Wall-clock budget for the whole run, in minutes.", lower_bound=1.0)
  flags.DEFINE_enum("encoder", "hppnet", ["hppnet", "crnn"],
                    "Roll-based encoder to pretrain (HPPNet learns fastest at CPU sizes).")
  flags.DEFINE_enum("preset", "cpu", list(PRESETS), "cpu: the CPU recipe; gpu: published sizes for one GPU; smoke: runlocal configs (CI).")
  flags.DEFINE_string("data_dir", "", "An existing MAESTRO-layout corpus to use instead of rendering one.")
  flags.DEFINE_string("steps", "", "STAGE=N,...: train these stages for exactly N steps instead of their share of "
                      "--minutes (the steps line under a run's table, e.g. from its results.txt, repeats that run).")
  flags.DEFINE_float("corpus_minutes", None, "Minutes of audio to render for the corpus (default: the preset's; "
                     "rendering comes out of the --minutes budget).", lower_bound=1.0)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
