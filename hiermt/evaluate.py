"""Scores transcriptions of a MAESTRO-layout split and writes a Table-I style report.

  python -m hiermt.evaluate --workdir=DIR --data_dir=MAESTRO_DIR [--split=test]
      [--layout=hierarchy|flatten|roll|all] [--checkpoint=best|latest] [--predictions=MIDI_DIR]
      [--output_dir=OUT] [--max_pieces=N] [--plot_seconds=S]

Model mode (no --predictions) transcribes each piece's audio with every layout
trained in WORKDIR (`hiermt.transcribe`), or only --layout, reading each stage's
best checkpoint (highest validation note F1 during training; its latest where
none was scored) or, with --checkpoint=latest, its latest. --predictions
scores another system's MIDI files instead: MIDI_DIR/<audio stem>.mid (or
.midi) per piece, read with `notes.read_midi`, so pedal CCs in them extend
their notes as played; --workdir is then not needed. A prediction file that
does not exist counts as an empty transcription (every metric 0 for that
piece): it is warned about on stderr and under the table, and listed in
metrics.json under "missing_predictions".

Every system is scored against the sustain-extended reference MIDI under one
protocol (`hiermt.metrics`), whole pieces, mean over pieces. Outputs, in
--output_dir (default WORKDIR/eval/SPLIT; with --predictions always
MIDI_DIR/eval/SPLIT, so another system's scores never overwrite the model's),
each written atomically:

  metrics.json                   per system: mean, per-piece metrics, protocol
  per_piece_<system>.csv         one row per piece
  plots/<system>/<stem>.png      piano roll of the first --plot_seconds seconds,
                                 reference vs prediction (0 = no plots)

The table goes to stdout; input problems (no MAESTRO index, an empty split, an
untrained layout, an unreadable MIDI file) end the run with one line on
stderr and exit status 2.
"""

import collections
import csv
import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from matplotlib import collections as mpl_collections
from matplotlib import figure as mpl_figure
from matplotlib import lines as mpl_lines
from matplotlib import patches as mpl_patches
import numpy as np
import tqdm

from hiermt import atomic_file
from hiermt import command_logging
from hiermt import metrics
from hiermt import notes as notes_lib
from hiermt.data import maestro

LAYOUTS = ("roll", "flatten", "hierarchy")  # Table I row order
PREDICTIONS = "predictions"
DISPLAY_NAMES = {"roll": "Roll", "flatten": "Flatten", "hierarchy": "Hierarchy", PREDICTIONS: "predictions"}
METRICS_FILE = "metrics.json"
_TRAIN_COMMAND = "python -m hiermt.main --config=configs/base.py:STAGE --workdir={workdir}"
# Table columns: (header, metric key).
_COLUMNS = (("On P", "onset_precision"), ("On R", "onset_recall"), ("On F1", "onset_f1"),
            ("On-Off F1", "onset_offset_f1"), ("On-Off-Vel F1", "onset_offset_velocity_f1"),
            ("Frame F1", "frame_f1"))
_PIECE_FIELDS = ("piece_id", "audio_filename", "midi_filename", "canonical_composer", "canonical_title",
                 "duration")

@dataclasses.dataclass(frozen=True)
class Options:
  """One evaluation run; the fields mirror the flags (see the module docstring)."""

  data_dir: str
  workdir: str | None = None
  split: str = "test"
  layout: str = "all"
  checkpoint: str = "best"
  predictions: str | None = None
  output_dir: str | None = None
  max_pieces: int | None = None
  plot_seconds: float = 20.0
  dtype: str | None = None  # the decoders' compute dtype (transcribe.load); None: as trained
  min_pitch_prob: float | None = None  # hierarchy's unsure-pitch rule (transcribe.load); None: the stage's config
  layout_given: bool = False  # --layout was on the command line

  @classmethod
  def from_flags(cls) -> "Options":
    """The values of the flags of `_define_flags`, once parsed."""
    f = flags.FLAGS
    return cls(data_dir=f.data_dir, workdir=f.workdir, split=f.split, layout=f.layout, checkpoint=f.checkpoint,
               predictions=f.predictions,
               output_dir=f.output_dir, max_pieces=f.max_pieces, plot_seconds=f.plot_seconds, dtype=f.dtype,
               min_pitch_prob=f.min_pitch_prob, layout_given=f["layout"].present)


class EvaluationError(Exception):
  """A problem with the inputs, reported as one line (exit status 2) rather than a traceback."""


def audio_stem(piece: maestro.Piece) -> str:
  """The audio file name without folder and extension: the name of a piece's prediction file."""
  return os.path.splitext(os.path.basename(piece.audio_filename))[0]


def load_pieces(data_dir, split, max_pieces=None, check_files=True) -> list[maestro.Piece]:
  """The first `max_pieces` (None: all) pieces of `split`.

  Raises:
    EvaluationError: no MAESTRO index in `data_dir`, a bad index, a missing
      file (with check_files), or a split without pieces.
  """
  try:
    pieces = maestro.pieces(data_dir, split, check_files=check_files)
  except (FileNotFoundError, ValueError) as e:
    raise EvaluationError(str(e)) from e
  if not pieces:
    raise EvaluationError(f"split {split!r} of {data_dir} has no pieces; choose another --split "
                          f"(one of {', '.join(maestro.SPLITS)}) or another --data_dir")
  return pieces[:max_pieces] if max_pieces else pieces


def read_reference(piece: maestro.Piece) -> notes_lib.Notes:
  """The piece's sustain-extended reference notes.

  The index may name `.midi` where the file is `.mid` (or the reverse) when
  the index was read without checking files, so both are tried.
  """
  stem = os.path.splitext(piece.midi_path)[0]
  candidates = [piece.midi_path] + [stem + ext for ext in (".midi", ".mid")]
  path = next((p for p in candidates if os.path.exists(p)), piece.midi_path)
  try:
    return notes_lib.read_midi(path)
  except (FileNotFoundError, notes_lib.MidiError) as e:
    raise EvaluationError(f"reference MIDI of {piece.piece_id}: {e}") from e


class MidiPredictions:
  """A predict function over a folder of MIDI files named `<audio stem>.mid` or `.midi`.

  A missing file is an empty transcription; its expected path is appended to
  `missing` and warned about.
  """

  def __init__(self, directory, pieces):
    if not os.path.isdir(directory):
      raise EvaluationError(f"--predictions={directory} is not a folder")
    stems = collections.Counter(audio_stem(p) for p in pieces)
    if clashes := sorted(s for s, count in stems.items() if count > 1):
      raise EvaluationError(f"several pieces share the audio stem {clashes[0]!r}, so one prediction file "
                            "cannot be told apart from the other; score a split without clashes")
    self.directory = directory
    self.missing = []  # [{"piece_id", "expected"}]

  def path(self, piece):
    """The prediction file of `piece`, or None if there is none."""
    for ext in (".mid", ".midi"):
      candidate = os.path.join(self.directory, audio_stem(piece) + ext)
      if os.path.exists(candidate):
        return candidate
    return None

  def __call__(self, piece) -> notes_lib.Notes:
    path = self.path(piece)
    if path is None:
      expected = os.path.join(self.directory, audio_stem(piece) + ".mid")
      logging.warning("MISSING PREDICTION %s (.midi neither): piece %s scored as an empty transcription",
                      expected, piece.piece_id)
      self.missing.append({"piece_id": piece.piece_id, "expected": expected})
      return notes_lib.Notes.empty()
    try:
      return notes_lib.read_midi(path)
    except notes_lib.MidiError as e:
      raise EvaluationError(str(e)) from e


def score_pieces(pieces, predict_fn, reference_fn=read_reference, on_piece=None, desc=None) -> list[dict]:
  """Scores `predict_fn` on every piece, with a progress bar.

  Args:
    pieces: list[maestro.Piece].
    predict_fn: piece -> Notes, the transcription.
    reference_fn: piece -> Notes, the sustain-extended reference.
    on_piece: optional callback (piece, reference, estimate, row), e.g. to plot.
    desc: progress bar label.

  Returns:
    One flat dict per piece: the piece's index fields (`_PIECE_FIELDS`),
    "reference_notes" and "estimated_notes" counts, and `metrics.METRIC_KEYS`.
  """
  rows = []
  for piece in tqdm.tqdm(pieces, desc=desc, unit="piece", file=sys.stderr, dynamic_ncols=True):
    reference = reference_fn(piece)
    estimate = predict_fn(piece)
    row = {k: getattr(piece, k) for k in _PIECE_FIELDS}
    row.update(reference_notes=len(reference), estimated_notes=len(estimate))
    row.update(metrics.note_metrics(reference, estimate))
    if on_piece is not None:
      on_piece(piece, reference, estimate, row)
    rows.append(row)
  return rows


def summarize(rows) -> dict:
  """A system's report entry: piece count, mean metrics, the per-piece rows and the protocol."""
  mean = metrics.mean_metrics([{k: row[k] for k in metrics.METRIC_KEYS} for row in rows])
  return {"pieces": len(rows), "mean": mean, "per_piece": rows, "protocol": metrics.PROTOCOL}


def format_table(results: dict) -> str:
  """Table I: one row per system (in `results` order), piece count and mean metrics.

  Args:
    results: system name ("roll", ..., "predictions") -> `summarize` output.
  """
  headers = ["system", "pieces"] + [h for h, _ in _COLUMNS]
  lines = [[DISPLAY_NAMES.get(name, name), str(r["pieces"])] + [f"{r['mean'][k]:.3f}" for _, k in _COLUMNS]
           for name, r in results.items()]
  widths = [max(len(row[i]) for row in [headers] + lines) for i in range(len(headers))]

  def fmt(row):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

  rule = "-" * len(fmt(headers))
  return "\n".join([fmt(headers), rule] + [fmt(row) for row in lines])


def _write_csv(path, rows):
  """One CSV row per piece, columns in the rows' key order."""
  with atomic_file.atomic_output(path) as tmp:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


def write_report(output_dir, results: dict, info: dict) -> list[str]:
  """Writes metrics.json and one per-piece CSV per system, each atomically.

  Args:
    output_dir: the report folder (created if needed).
    results: system name -> `summarize` output (may hold "missing_predictions").
    info: run-level fields for the JSON (split, data_dir, ...).

  Returns:
    The paths written.
  """
  paths = []
  for name, result in results.items():
    path = os.path.join(output_dir, f"per_piece_{name}.csv")
    _write_csv(path, result["per_piece"])
    paths.append(path)
  path = os.path.join(output_dir, METRICS_FILE)
  with atomic_file.atomic_output(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(dict(info, protocol=metrics.PROTOCOL, layouts=results), f, indent=1)
  return [path] + paths


def _rectangles(notes, seconds, **style):
  """Note boxes (time x pitch, 0.8 semitones high) clipped to [0, seconds]."""
  boxes = [mpl_patches.Rectangle((on, p - 0.4), min(off, seconds) - on, 0.8)
           for on, off, p in zip(notes.onset, notes.offset, notes.pitch)]
  return mpl_collections.PatchCollection(boxes, **style)


def plot_piece(path, reference: notes_lib.Notes, estimate: notes_lib.Notes, title: str, seconds=20.0):
  """Writes a PNG piano roll of the first `seconds` seconds, reference vs estimate.

  Reference notes are filled blue boxes; estimated notes are outlines, green
  where the estimate matches a reference note on onset (mir_eval onset
  matching over the whole piece), red where it matches none; reference
  onsets that no estimate matched are black crosses.
  """
  onset_matches = metrics.match_notes(reference, estimate, offset_ratio=None)  # [k, 2]
  ref_hit = np.zeros(len(reference), bool)
  est_hit = np.zeros(len(estimate), bool)
  ref_hit[onset_matches[:, 0]] = True
  est_hit[onset_matches[:, 1]] = True
  ref_in = reference.onset < seconds  # [n]
  est_in = estimate.onset < seconds  # [m]

  def subset(n, keep):
    return notes_lib.Notes(n.onset[keep], n.offset[keep], n.pitch[keep], n.velocity[keep])

  # A Figure without pyplot renders with Agg and keeps no global state between plots.
  fig = mpl_figure.Figure(figsize=(12, 5), dpi=100)
  ax = fig.add_subplot()
  ax.add_collection(_rectangles(subset(reference, ref_in), seconds, facecolor="tab:blue", alpha=0.35,
                                edgecolor="none"))
  ax.add_collection(_rectangles(subset(estimate, est_in & est_hit), seconds, facecolor="none",
                                edgecolor="tab:green", linewidth=1.0))
  ax.add_collection(_rectangles(subset(estimate, est_in & ~est_hit), seconds, facecolor="none",
                                edgecolor="tab:red", linewidth=1.0))
  missed = ref_in & ~ref_hit
  ax.plot(reference.onset[missed], reference.pitch[missed], "x", color="black", markersize=5)
  pitches = np.concatenate([reference.pitch[ref_in], estimate.pitch[est_in]])
  low, high = (pitches.min(), pitches.max()) if len(pitches) else (21, 108)
  ax.set_xlim(0, seconds)
  ax.set_ylim(low - 1.5, high + 1.5)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("MIDI pitch")
  ax.set_title(title, fontsize=9)
  ax.legend(handles=[
      mpl_patches.Patch(facecolor="tab:blue", alpha=0.35, label="reference"),
      mpl_patches.Patch(facecolor="none", edgecolor="tab:green", label="prediction, onset matched"),
      mpl_patches.Patch(facecolor="none", edgecolor="tab:red", label="prediction, unmatched"),
      mpl_lines.Line2D([], [], marker="x", linestyle="none", color="black", label="missed reference onset"),
  ], loc="upper right", fontsize=7)
  fig.tight_layout()
  with atomic_file.atomic_output(path) as tmp:
    fig.savefig(tmp, format="png")


def _plotter(output_dir, system, seconds):
  """The `score_pieces` callback that writes each piece's PNG, or None for no plots."""
  if not seconds:
    return None

  def plot(piece, reference, estimate, row):
    title = (f"{piece.canonical_composer}: {piece.canonical_title} ({piece.piece_id})\n"
             f"{DISPLAY_NAMES[system]}, whole piece: On F1 {row['onset_f1']:.3f}, "
             f"On-Off F1 {row['onset_offset_f1']:.3f}, Frame F1 {row['frame_f1']:.3f}; first {seconds:g} s shown")
    plot_piece(os.path.join(output_dir, "plots", system, audio_stem(piece) + ".png"), reference, estimate,
               title, seconds)

  return plot


def _model_predictors(workdir, layout, which, dtype=None, min_pitch_prob=None):
  """Yields (layout, predict_fn) for each layout to score, loading one model at a time from each stage's
  `which` ("best" or "latest") checkpoint, its decoders computing in `dtype` (None: as trained), the
  hierarchy's unsure-pitch rule at `min_pitch_prob` (None: as configured; `transcribe.load`)."""
  try:
    from hiermt import transcribe  # pylint: disable=import-outside-toplevel  (heavy: JAX and the models)
  except ImportError as e:
    raise EvaluationError(f"cannot transcribe: hiermt.transcribe is not importable ({e}); "
                          "score MIDI files with --predictions instead") from e
  if not os.path.isdir(workdir):
    raise EvaluationError(f"--workdir={workdir} does not exist; train with `{_TRAIN_COMMAND.format(workdir=workdir)}`")
  if layout == "all":
    available = set(transcribe.available_layouts(workdir))
    layouts = [name for name in LAYOUTS if name in available]
    if not layouts:
      raise EvaluationError(f"{workdir} holds no trained layout; train its stages with "
                            f"`{_TRAIN_COMMAND.format(workdir=workdir)}`")
  else:
    layouts = [layout]
  for name in layouts:
    try:
      transcriber = transcribe.load(workdir, layout=name, which=which, dtype=dtype, min_pitch_prob=min_pitch_prob)
    except (FileNotFoundError, ValueError) as e:
      raise EvaluationError(f"layout {name} is not available: {e}") from e
    yield name, lambda piece, t=transcriber: t.transcribe(piece.audio_path)


def run(options: Options) -> dict:
  """Scores every system of `options`, writes the report and prints the table.

  Returns:
    system name -> `summarize` output, as written to metrics.json.
  Raises:
    EvaluationError: a problem with the inputs, in one line.
  """
  if not options.data_dir:
    raise EvaluationError("--data_dir is required: a MAESTRO v3 folder (or a corpus from "
                          "`python -m hiermt.data.synth --output_dir=DIR`)")
  predictions, split = options.predictions, options.split
  if predictions and options.layout_given:
    raise EvaluationError("--layout chooses trained layouts to transcribe with; it does not apply to --predictions")
  if not predictions and not options.workdir:
    raise EvaluationError("--workdir is required unless --predictions=MIDI_DIR is given")
  # Scoring MIDI files needs no audio, so a MIDI-only MAESTRO download is enough.
  pieces = load_pieces(options.data_dir, split, options.max_pieces, check_files=not predictions)
  if predictions:
    midi_predictions = MidiPredictions(predictions, pieces)
    systems = [(PREDICTIONS, midi_predictions)]
    output_dir = options.output_dir or os.path.join(predictions, "eval", split)
  else:
    midi_predictions = None
    systems = _model_predictors(options.workdir, options.layout, options.checkpoint, options.dtype,
                                options.min_pitch_prob)
    output_dir = options.output_dir or os.path.join(options.workdir, "eval", split)

  references = {}  # piece_id -> Notes, read once for all layouts

  def reference_fn(piece):
    if piece.piece_id not in references:
      references[piece.piece_id] = read_reference(piece)
    return references[piece.piece_id]

  results = {}
  for name, predict_fn in systems:
    rows = score_pieces(pieces, predict_fn, reference_fn, _plotter(output_dir, name, options.plot_seconds),
                        desc=DISPLAY_NAMES[name])
    results[name] = summarize(rows)
  if midi_predictions is not None:
    missing_ids = {m["piece_id"] for m in midi_predictions.missing}
    for row in results[PREDICTIONS]["per_piece"]:
      row["prediction_missing"] = row["piece_id"] in missing_ids
    results[PREDICTIONS]["missing_predictions"] = midi_predictions.missing

  info = {"split": split, "data_dir": os.path.abspath(options.data_dir),
          "workdir": os.path.abspath(options.workdir) if options.workdir else None,
          "predictions": os.path.abspath(predictions) if predictions else None,
          "checkpoint": None if predictions else options.checkpoint,
          "dtype": None if predictions else (options.dtype or "as trained"),
          "min_pitch_prob": None if predictions else (
              "as configured" if options.min_pitch_prob is None else options.min_pitch_prob),
          "max_pieces": options.max_pieces}
  paths = write_report(output_dir, results, info)
  print(format_table(results))
  if midi_predictions is not None and midi_predictions.missing:
    missing = [m["expected"] for m in midi_predictions.missing]
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more (see metrics.json)" if len(missing) > 5 else "")
    print(f"WARNING: {len(missing)} of {len(pieces)} prediction files missing, scored as empty "
          f"transcriptions: {shown}")
  plots = f", piano rolls in {os.path.join(output_dir, 'plots')}" if options.plot_seconds else ""
  print(f"report: {paths[0]} (+ {len(paths) - 1} CSV{plots})")
  return results


def _define_flags():
  """The command-line flags; defined only when run as a script, so importing this module claims no flag names."""
  flags.DEFINE_string("workdir", None, "Run directory with trained stages (not needed with --predictions).")
  flags.DEFINE_string("data_dir", None, "MAESTRO-v3-layout folder holding the reference MIDI and audio.")
  flags.DEFINE_enum("split", "test", maestro.SPLITS, "Split to score.")
  flags.DEFINE_enum("layout", "all", LAYOUTS + ("all",),
                    "Layout to transcribe with; all = every layout trained in --workdir.")
  # checkpoint.CHOICES, spelt out: importing hiermt.checkpoint loads JAX, which --predictions does without.
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Each stage's best checkpoint (highest validation note F1 during training; the latest where "
                    "none was scored) or its latest.")
  flags.DEFINE_string(
      "predictions", None,
      "Folder of another system's MIDI files named <audio stem>.mid (or .midi), scored instead of "
      "transcribing. A missing file is scored as an empty transcription (all metrics 0), warned about "
      "and listed in metrics.json.")
  flags.DEFINE_string(
      "output_dir", None, "Report folder; default WORKDIR/eval/SPLIT, or PREDICTIONS/eval/SPLIT with --predictions.")
  flags.DEFINE_integer("max_pieces", None, "Score only the first N pieces of the split (index order).",
                       lower_bound=1)
  flags.DEFINE_float("plot_seconds", 20.0, "Seconds from the start shown in each piano-roll PNG; 0 writes no plots.",
                     lower_bound=0.0)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "The decoders' compute dtype, as hiermt.transcribe's --dtype (default: as trained).")
  flags.DEFINE_float("min_pitch_prob", None,
                     "Hierarchy's unsure-pitch rule, as hiermt.transcribe's --min_pitch_prob (default: the "
                     "stage's config).",
                     lower_bound=0.0, upper_bound=1.0)


def main(argv):
  command_logging.hiermt_info_only()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  options = Options.from_flags()
  try:
    run(options)
  except EvaluationError as e:
    print(f"hiermt.evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
