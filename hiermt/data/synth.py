"""Builds a MAESTRO-v3-layout piano corpus by rendering allowed MIDI with FluidSynth.

  python -m hiermt.data.synth --output_dir=DIR [--minutes=120] [--seed=0]

Three kinds of material (design.md §5), each cut into pieces of 30–90 s
(shorter for tiny corpora):
  * maestro: excerpts of the non-reserved MAESTRO performances shipped with miditok;
  * music21: non-reserved works of music21's corpus, played by a humanising
    model (rubato, dynamics, articulation, sustain pedal);
  * procedural: piano writing built from chord progressions (block chords,
    scales, arpeggios, Alberti bass, repeated notes, leaps, wide dynamics, pedal).

Every piece is written once as a type-1 MIDI file (program 0, CC64 pedal), the
ground truth, and rendered with the `fluidsynth` CLI from a copy that differs only
in its first events: the GM piano program, effect sends and tuning. Timbre
(SoundFont x program), gain, room (reverb), chorus and tuning vary per piece, and
training pieces are transposed by a few semitones (their MIDI is the transposed
one). One timbre and one room, HELDOUT, are never used for these renderings: the
test pieces are rendered again with them into OUTPUT_DIR/heldout, a MAESTRO-layout
corpus of its own, to measure generalisation to a piano and a room training never
heard. WAVs are 16-bit mono at `sample_rate`. Everything is a pure function of the
seed except the rendering itself, and every file is written under a temporary
name first. Besides the MAESTRO index, `hiermt_synth.json` records each piece's
source, split, transposition and rendering settings.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

from absl import app
from absl import flags
from absl import logging
import mido
import numpy as np
import pretty_midi
import soundfile
import tqdm

from hiermt import atomic_file
from hiermt import command_logging
from hiermt.data import maestro
from hiermt.data import sources

DEFAULT_MINUTES = 120.0
MANIFEST_NAME = "hiermt_synth.json"
# Share of the audio budget per kind of material.
KIND_SHARES = {"maestro": 0.5, "music21": 0.3, "procedural": 0.2}
SPLIT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}
YEARS = (2004, 2006, 2008, 2009, 2011, 2013, 2014, 2015, 2017, 2018)
# Audio kept after the last MIDI event, for release and reverb tails.
TAIL_SECONDS = 1.0
_MIDI_RESOLUTION = 960  # ticks per beat at 120 bpm: 0.52 ms per tick
_PIANO_RANGE = (21, 108)
# music21 corpus folders that hold demos and exercises rather than music.
_MUSIC21_SKIP = ("demos", "theoryExercises", "leadSheet")
_MUSIC21_EXTENSIONS = (".mxl", ".xml", ".musicxml")


@dataclasses.dataclass
class Performance:
  """Raw piano notes (not sustain-extended) and CC64 pedal events, times in seconds."""

  onset: np.ndarray  # [notes] float64
  offset: np.ndarray  # [notes] float64
  pitch: np.ndarray  # [notes] int32
  velocity: np.ndarray  # [notes] int32
  pedal_time: np.ndarray  # [events] float64
  pedal_value: np.ndarray  # [events] int32

  @classmethod
  def from_lists(cls, notes, pedal):
    """From (onset, offset, pitch, velocity) and (time, value) tuples."""
    n = np.asarray(notes, np.float64).reshape(-1, 4)
    p = np.asarray(sorted(pedal), np.float64).reshape(-1, 2)
    return cls(n[:, 0], n[:, 1], np.rint(n[:, 2]).astype(np.int32), np.rint(n[:, 3]).astype(np.int32),
               p[:, 0], np.rint(p[:, 1]).astype(np.int32))

  @property
  def end(self):
    """Time of the last note-off or pedal event."""
    return float(max(self.offset.max(initial=0.0), self.pedal_time.max(initial=0.0)))


# ---------------------------------------------------------------------------
# Performances: cleaning, excerpts, MIDI bytes
# ---------------------------------------------------------------------------


def clean(perf, min_duration=0.03):
  """Makes a performance unambiguous as MIDI ground truth.

  Pitches are folded by octaves into the piano range, velocities clipped to
  1–127, unisons struck within `min_duration` merged, and a note is cut 10 ms
  before the next onset of its pitch, so no two notes of one pitch overlap.
  """
  pitch = perf.pitch.astype(np.int64)
  low, high = _PIANO_RANGE
  pitch = np.where(pitch < low, pitch + 12 * ((low - pitch + 11) // 12), pitch)
  pitch = np.where(pitch > high, pitch - 12 * ((pitch - high + 11) // 12), pitch)
  onset = np.maximum(perf.onset, 0.0)
  offset = np.maximum(perf.offset, onset + min_duration)
  velocity = np.clip(perf.velocity, 1, 127)
  order = np.lexsort((onset, pitch))  # by pitch, then onset
  keep = np.ones(len(onset), bool)
  last = {}  # pitch -> index of the previous kept note of that pitch
  for i in order:
    j = last.get(pitch[i])
    if j is not None and onset[i] - onset[j] < min_duration:
      offset[j], velocity[j] = max(offset[j], offset[i]), max(velocity[j], velocity[i])
      keep[i] = False
      continue
    if j is not None:  # onsets are >= min_duration apart here, so the cut note keeps >= 20 ms
      offset[j] = min(offset[j], onset[i] - 0.01)
    last[pitch[i]] = i
  idx = np.flatnonzero(keep)
  idx = idx[np.lexsort((pitch[idx], onset[idx]))]
  pedal_order = np.argsort(perf.pedal_time, kind="stable")
  return Performance(onset[idx], offset[idx], pitch[idx].astype(np.int32), velocity[idx].astype(np.int32),
                     np.maximum(perf.pedal_time[pedal_order], 0.0),
                     np.clip(perf.pedal_value[pedal_order], 0, 127).astype(np.int32))


def excerpt(perf, start, end):
  """Notes struck in [start, end), shifted to start at 0 and cut at the end; pedal state carried in."""
  length = end - start
  sel = (perf.onset >= start) & (perf.onset < end - 0.03)
  before = perf.pedal_time <= start
  inside = (perf.pedal_time > start) & (perf.pedal_time < end)
  carried = perf.pedal_value[before][-1:]  # the pedal as it stands at `start`
  pedal_time = np.concatenate([np.zeros(len(carried)), perf.pedal_time[inside] - start, [length]])
  pedal_value = np.concatenate([carried, perf.pedal_value[inside], [0]]).astype(np.int32)
  return Performance(perf.onset[sel] - start, np.minimum(perf.offset[sel], end) - start, perf.pitch[sel],
                     perf.velocity[sel], pedal_time, pedal_value)


def midi_bytes(perf):
  """The performance as a standard MIDI file (piano, program 0, CC64), as bytes."""
  pm = pretty_midi.PrettyMIDI(resolution=_MIDI_RESOLUTION, initial_tempo=120.0)
  piano = pretty_midi.Instrument(program=0, name="Piano")
  piano.notes = [pretty_midi.Note(velocity=int(v), pitch=int(p), start=float(a), end=float(b))
                 for a, b, p, v in zip(perf.onset, perf.offset, perf.pitch, perf.velocity)]
  piano.control_changes = [pretty_midi.ControlChange(64, int(v), float(t))
                           for t, v in zip(perf.pedal_time, perf.pedal_value)]
  pm.instruments.append(piano)
  buf = io.BytesIO()
  pm.write(buf)
  return buf.getvalue()


def read_source_midi(path):
  """All non-drum notes and CC64 events of a MIDI file, unextended."""
  pm = pretty_midi.PrettyMIDI(str(path))
  notes, pedal = [], []
  for inst in pm.instruments:
    if inst.is_drum:
      continue
    notes += [(n.start, n.end, n.pitch, n.velocity) for n in inst.notes]
    pedal += [(c.time, c.value) for c in inst.control_changes if c.number == 64]
  if not notes:
    raise ValueError(f"{path}: no notes")
  return Performance.from_lists(notes, pedal)


# ---------------------------------------------------------------------------
# music21 works, humanised
# ---------------------------------------------------------------------------


def music21_candidates():
  """Non-reserved music21 corpus scores, grouped by composer folder: {composer: [paths]}."""
  from music21 import corpus  # pylint: disable=g-import-not-at-top  (slow import, only needed here)

  groups = collections.defaultdict(list)
  for path in sorted(str(p) for p in corpus.getPaths()):
    composer = _corpus_relpath(path).split("/")[0]
    if composer in _MUSIC21_SKIP or not path.endswith(_MUSIC21_EXTENSIONS):
      continue
    try:
      sources.check_not_reserved(path)
    except sources.ReservedMaterialError:
      continue
    groups[composer].append(path)
  return dict(groups)


def _score_events(score):
  """(quarter offset, midi pitch, quarter length) per sounding note, ties merged, plus measure starts."""
  from music21 import stream  # pylint: disable=g-import-not-at-top

  parts = list(score.parts) or [score]
  events = []
  for part in parts:
    open_ties = {}  # pitch -> event still tied forward
    for n in part.flatten().notes:
      start, length = float(n.offset), float(n.duration.quarterLength)
      if length <= 0:  # grace notes have no duration of their own
        continue
      for member in (n.notes if n.isChord else (n,)):
        if not hasattr(member, "pitch"):  # unpitched percussion
          continue
        key, tie = member.pitch.midi, (member.tie.type if member.tie is not None else None)
        if tie in ("continue", "stop") and key in open_ties:
          ev = open_ties[key]
          ev[2] = start + length - ev[0]
          if tie == "stop":
            del open_ties[key]
          continue
        ev = [start, key, length]
        events.append(ev)
        if tie in ("start", "continue"):
          open_ties[key] = ev
  bars = sorted({float(m.offset) for m in parts[0].getElementsByClass(stream.Measure)})
  return np.asarray(events, np.float64).reshape(-1, 3), bars


def humanise(events, bars, rng):
  """Plays score events (quarter offset, pitch, quarter length) like a pianist.

  The tempo puts the typical inter-onset interval at 0.15–0.45 s; rubato is a
  smooth random tempo curve with a final ritardando; dynamics a
  slow random curve with bar accents and a louder top voice; articulation a
  per-work legato factor with occasional staccato; the sustain pedal is
  changed at bar lines (sometimes half bars) with a short legato gap.
  """
  q_on, pitch, q_len = events[:, 0], events[:, 1] + rng.integers(-3, 4), events[:, 2]
  q_end = float((q_on + q_len).max())
  # Tempo from the score's typical inter-onset interval, so half-note-beat works are not dragged.
  ioi = np.diff(np.unique(q_on))
  bpm = np.clip(60.0 * (np.median(ioi) if len(ioi) else 1.0) / rng.uniform(0.15, 0.45), 40.0, 200.0)
  grid = np.arange(0.0, q_end + 1.0, 0.125)  # [steps] in quarters
  log_tempo = sum(rng.uniform(0.03, 0.1) * np.sin(2 * np.pi * grid / rng.uniform(6, 40) + rng.uniform(0, 6.3))
                  for _ in range(3))
  tempo = bpm * np.exp(log_tempo) * np.interp(grid, [max(q_end - 4, 0), q_end], [1.0, 0.7])
  seconds = np.concatenate([[0.0], np.cumsum(60.0 / tempo[:-1] * 0.125)])  # [steps]
  to_s = lambda q: np.interp(q, grid, seconds)

  legato = rng.uniform(0.8, 1.0)
  staccato = (q_len <= 0.5) & (rng.random(len(q_len)) < rng.uniform(0.0, 0.5))
  factor = np.where(staccato, rng.uniform(0.35, 0.55, len(q_len)), legato)
  onset = to_s(q_on) + rng.normal(0, 0.008, len(q_on))
  offset = np.maximum(to_s(q_on + q_len * factor), onset + 0.05)

  bar_starts = np.asarray(bars or np.arange(0.0, q_end, 4.0))
  phase, period = rng.uniform(0, 6.3), rng.uniform(12, 40)
  level = rng.uniform(45, 85) + rng.uniform(8, 22) * np.sin(2 * np.pi * q_on / period + phase)
  accent = 7.0 * np.isin(np.round(q_on, 3), np.round(bar_starts, 3))
  # The highest note of each onset carries the melody.
  order = np.lexsort((pitch, q_on))
  top = np.zeros(len(q_on), bool)
  top[order[np.append(q_on[order][1:] != q_on[order][:-1], True)]] = True
  velocity = np.clip(level + accent + 6.0 * top + rng.normal(0, 4, len(q_on)), 5, 122)

  pedal = []
  if rng.random() < 0.75:
    changes = list(bar_starts)
    if rng.random() < 0.3:
      changes += list((bar_starts[:-1] + bar_starts[1:]) / 2)
    for t in np.sort(to_s(np.asarray(changes))):
      up = t + rng.uniform(0.02, 0.08)
      pedal += [(up, 0), (up + rng.uniform(0.05, 0.15), rng.integers(80, 128))]
    pedal.append((float(offset.max()), 0))
  return clean(Performance.from_lists(np.stack([onset, offset, pitch, velocity], 1), pedal))


def music21_performance(path, rng):
  """A humanised performance of one music21 corpus score."""
  from music21 import converter  # pylint: disable=g-import-not-at-top
  from music21.musicxml import xmlToM21  # pylint: disable=g-import-not-at-top

  sources.check_not_reserved(path)
  with warnings.catch_warnings():  # a few corpus files have overfull bars; music21 repairs them
    warnings.simplefilter("ignore", xmlToM21.MusicXMLWarning)
    score = converter.parse(path)
  events, bars = _score_events(score)
  if len(events) < 8:
    raise ValueError(f"{path}: only {len(events)} notes")
  return humanise(events, bars, rng)


# ---------------------------------------------------------------------------
# Procedural piano writing
# ---------------------------------------------------------------------------

_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Next scale degree (0-based) after each degree: common-practice chord moves.
_PROGRESSIONS = {0: (3, 4, 5, 1), 1: (4, 6), 2: (5, 3), 3: (4, 0, 1), 4: (0, 5), 5: (1, 3, 4), 6: (0, 2)}
TEXTURES = ("chords", "scale", "arpeggio", "alberti", "repeated", "leaps")


def _in_range(pcs, low, high):
  """All piano pitches in [low, high] whose pitch class is in `pcs`."""
  return [p for p in range(max(low, 21), min(high, 108) + 1) if p % 12 in pcs]


def _bar(texture, rng, t, beat, chord, scale_pcs, rh, lh):
  """One 4-beat bar of `texture`: list of (onset, duration, pitch, accent)."""
  root = chord[0]
  tones = set(chord)
  out = []
  if texture == "chords":
    step = beat * rng.choice([0.5, 1.0, 2.0, 4.0])
    upper = _in_range(tones, rh - 6, rh + 8)[:4]
    bass = _in_range({root}, lh - 6, lh + 6)[:1]
    for k in range(int(round(4 * beat / step))):
      for p in upper + bass + [b + 12 for b in bass]:
        out.append((t + k * step, step * 0.9, p, 8 if k == 0 else 0))
  elif texture == "scale":
    run = _in_range(scale_pcs, rh - 12, rh + 12)
    i, d = int(rng.integers(len(run))), rng.choice([-1, 1])
    for k in range(16):
      out.append((t + k * beat / 4, beat / 4 * 0.9, run[i], 6 if k % 4 == 0 else 0))
      if not 0 <= i + d < len(run):
        d = -d
      i += d
    for p in _in_range(tones, lh, lh + 12)[:3]:
      out.append((t, 4 * beat * 0.95, p, 0))
  elif texture == "arpeggio":
    span = _in_range(tones, lh, lh + int(rng.integers(24, 40)))
    n = int(rng.choice([12, 16]))
    path = span + span[-2:0:-1]
    for k in range(n):
      out.append((t + k * 4 * beat / n, beat, path[k % len(path)], 6 if k == 0 else 0))
  elif texture == "alberti":
    low = _in_range(tones, lh, lh + 12)[:3]
    pattern = [low[0], low[-1], low[1 % len(low)], low[-1]]
    for k in range(8):
      out.append((t + k * beat / 2, beat / 2 * 0.9, pattern[k % 4], 4 if k == 0 else 0))
    melody = _in_range(scale_pcs, rh - 7, rh + 7)
    i, k = int(rng.integers(len(melody))), 0.0
    while k < 4:
      dur = rng.choice([0.5, 1.0, 1.0, 2.0])
      dur = min(dur, 4 - k)
      out.append((t + k * beat, dur * beat * 0.95, melody[i], 8 if k == 0 else 3))
      i = int(np.clip(i + rng.integers(-2, 3), 0, len(melody) - 1))
      k += dur
  elif texture == "repeated":
    p = _in_range(tones, rh - 6, rh + 6)[int(rng.integers(2))]
    double = rng.random() < 0.5
    for k in range(16):
      for q in ([p, p + 4] if double else [p]):
        out.append((t + k * beat / 4, beat / 4 * 0.5, q, 6 if k % 4 == 0 else 0))
    for k in range(4):
      out.append((t + k * beat, beat * 0.9, _in_range({root}, lh - 6, lh + 6)[0], 0))
  else:  # leaps: stride bass from the bottom of the keyboard, octaves up high
    bass = _in_range({root}, 21, 21 + 24)
    mid = _in_range(tones, 48, 62)[:3]
    top = _in_range(tones, min(rh + 6, 84), 108 - 12)
    for k in range(4):
      chord_tones = [bass[int(rng.integers(len(bass)))]] if k % 2 == 0 else mid
      for p in chord_tones:
        out.append((t + k * beat, beat * 0.8, p, 10 if k == 0 else 0))
    for k in range(2):
      p = top[int(rng.integers(len(top)))]
      out += [(t + 2 * k * beat, 2 * beat * 0.9, p, 6), (t + 2 * k * beat, 2 * beat * 0.9, p + 12, 6)]
  return out


def procedural_performance(rng, seconds):
  """`seconds` of procedurally written piano music in sections of 2–4 bars of one texture."""
  scale = np.asarray(_SCALES[rng.choice(list(_SCALES))])
  tonic = int(rng.integers(12))
  scale_pcs = set(((scale + tonic) % 12).tolist())
  beat = 60.0 / rng.uniform(66.0, 150.0)
  notes, pedal = [], []
  t, degree = rng.uniform(0.1, 0.5), 0  # a short silence before the first note, as in a recording
  while t < seconds:
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    bars = int(rng.integers(2, 5))
    v_from, v_to = rng.uniform(12, 124, size=2)  # crescendo or diminuendo over the section
    rh, lh = int(rng.integers(55, 92)), int(rng.integers(30, 52))
    use_pedal = texture not in ("scale", "repeated") and rng.random() < 0.7
    for b in range(bars):
      level = v_from + (v_to - v_from) * b / max(bars - 1, 1)
      chord = [int((tonic + scale[(degree + k) % 7]) % 12) for k in (0, 2, 4)]
      for on, dur, p, accent in _bar(texture, rng, t, beat, chord, scale_pcs, rh, lh):
        on += rng.normal(0, 0.006)
        notes.append((on, on + dur, p, level + accent + rng.normal(0, 5)))
      if use_pedal:
        up = t + rng.uniform(0.02, 0.06)
        pedal += [(up, 0), (up + rng.uniform(0.05, 0.12), rng.integers(90, 128))]
      elif pedal and pedal[-1][1] > 0:
        pedal.append((t + 0.02, 0))
      degree = int(rng.choice(_PROGRESSIONS[degree]))
      t += 4 * beat
  perf = clean(Performance.from_lists(notes, pedal))
  return excerpt(perf, 0.0, seconds)


# ---------------------------------------------------------------------------
# Planning: which pieces, from which sources
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Piece:
  kind: str
  source: str
  composer: str
  title: str
  window: tuple  # (start, end) seconds within the source performance
  perf: Performance


def _next_length(rng, remaining, low, high):
  """Length of the next piece in [low, high] seconds, or None once `remaining` is used up."""
  if remaining < low / 2:
    return None
  length = min(rng.uniform(low, high), remaining)
  return remaining if remaining - length < low / 2 else length


def _free_window(rng, perf, length, used, tries=20):
  """A window of up to `length` s in `perf`, overlapping no window in `used`, starting just before a note."""
  duration = float(perf.offset.max())
  for _ in range(tries):
    start = rng.uniform(0.0, max(duration - length, 0.0))
    after = perf.onset[perf.onset >= start]
    if not len(after):
      continue
    start = max(float(after[0]) - rng.uniform(0.05, 0.5), 0.0)
    end = min(start + length, duration)
    if all(end <= a or start >= b for a, b in used):
      return start, end
  return None


def _corpus_relpath(path):
  """A music21 corpus path relative to the corpus root, with '/' separators."""
  return str(path).replace("\\", "/").split("/corpus/")[-1]


def _maestro_pieces(rng, budget, low, high, cache_dir, skipped):
  """Excerpts of the allowed MAESTRO performances, taken from the sources in turn."""
  paths = [str(sources.check_not_reserved(p)) for p in sources.allowed_maestro_midis(cache_dir)]
  order = [paths[i] for i in rng.permutation(len(paths))]
  loaded, used = {}, collections.defaultdict(list)
  turn = 0
  while (length := _next_length(rng, budget, low, high)) is not None:
    for _ in range(len(order)):
      path = order[turn % len(order)]
      turn += 1
      if path not in loaded:
        try:
          loaded[path] = read_source_midi(sources.check_not_reserved(path))
        except Exception as e:  # pylint: disable=broad-except  (any unreadable MIDI is skipped)
          logging.warning("skipping source MIDI %s: %s", path, e)
          skipped.append(path)
          loaded[path] = None
      window = loaded[path] is not None and _free_window(rng, loaded[path], length, used[path])
      if window:
        used[path].append(window)
        budget -= window[1] - window[0]
        yield _Piece("maestro", path, "MAESTRO performance (miditok)",
                     f"{os.path.basename(path)} {window[0]:.1f}-{window[1]:.1f} s", window,
                     clean(excerpt(loaded[path], *window)))
        break
    else:  # every source is used up or unreadable
      return


def _music21_pieces(rng, budget, low, high, skipped):
  """Excerpts (at most two per work) of humanised music21 works, composers taken in turn."""
  groups = music21_candidates()
  composers = [sorted(groups)[i] for i in rng.permutation(len(groups))]
  queues = {c: [groups[c][i] for i in rng.permutation(len(groups[c]))] for c in composers}
  turn = 0
  while budget >= low / 2 and any(queues.values()):
    composer = composers[turn % len(composers)]
    turn += 1
    if not queues[composer]:
      continue
    path = queues[composer].pop()
    try:
      perf = music21_performance(path, rng)
    except Exception as e:  # pylint: disable=broad-except  (music21 cannot read every corpus file)
      logging.warning("skipping music21 work %s: %s", path, e)
      skipped.append(path)
      continue
    used = []
    while len(used) < 2 and (length := _next_length(rng, budget, low, high)) is not None:
      window = _free_window(rng, perf, length, used)
      if not window:
        break
      used.append(window)
      budget -= window[1] - window[0]
      yield _Piece("music21", path, composer, f"{_corpus_relpath(path)} {window[0]:.1f}-{window[1]:.1f} s",
                   window, clean(excerpt(perf, *window)))


def _procedural_pieces(rng, budget, low, high):
  """Procedural pieces filling `budget` seconds."""
  count = 0
  while (length := _next_length(rng, budget, low, high)) is not None:
    budget -= length
    count += 1
    yield _Piece("procedural", "procedural", "hiermt procedural", f"procedural study {count}", (0.0, length),
                 procedural_performance(rng, length))


def plan(minutes, seed, cache_dir="~/.cache/hiermt", skipped=None):
  """Yields the pieces of a `minutes`-long corpus for `seed`, deterministically.

  Args:
    minutes: total audio, split between the kinds by KIND_SHARES.
    seed: random seed; each kind draws from its own stream.
    cache_dir: where the miditok MIDIs are cached.
    skipped: list collecting the sources that could not be read.
  """
  skipped = [] if skipped is None else skipped
  total = minutes * 60.0
  high = float(np.clip(total / 8, 6.0, 90.0))  # tiny corpora still get several pieces
  low = high / 3
  for k, kind in enumerate(KIND_SHARES):
    rng = np.random.default_rng([seed, k])
    budget = KIND_SHARES[kind] * total
    if kind == "maestro":
      yield from _maestro_pieces(rng, budget, low, high, cache_dir, skipped)
    elif kind == "music21":
      yield from _music21_pieces(rng, budget, low, high, skipped)
    else:
      yield from _procedural_pieces(rng, budget, low, high)


class SplitAssigner:
  """Gives each piece its split as it is planned: about SPLIT_SHARES by duration.

  Streaming, so a piece can be rendered (and transposed if it trains) while the
  next ones are still being planned. The first three pieces go one to each split,
  in an order drawn from the seed; every later one to the split furthest below
  its share of the audio so far.
  """

  def __init__(self, seed):
    rng = np.random.default_rng([seed, len(KIND_SHARES)])
    self._first = [list(SPLIT_SHARES)[i] for i in rng.permutation(len(SPLIT_SHARES))]
    self._filled = dict.fromkeys(SPLIT_SHARES, 0.0)

  def __call__(self, duration):
    """The split of the next piece, `duration` seconds long."""
    if self._first:
      split = self._first.pop(0)
    else:
      total = sum(self._filled.values()) + duration
      split = max(SPLIT_SHARES, key=lambda s: SPLIT_SHARES[s] * total - self._filled[s])
    self._filled[split] += duration
    return split


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

# General MIDI programs a piece may be played with, on every allowed SoundFont:
# 0 acoustic grand, 1 bright acoustic grand, 2 electric grand (a CP-70: strings
# struck by hammers, picked up electrically), 3 honky-tonk (a detuned piano).
# Programs 4 and 5 are electric pianos (Rhodes tines, FM or reed tones): other
# instruments, whose near-sinusoidal notes no user's piano makes.
PIANO_PROGRAMS = (0, 1, 2, 3)
# The held-out timbre and room: never rendered for train, validation or test;
# the test pieces are rendered a second time with exactly these settings into
# OUTPUT_DIR/heldout, to measure how transcription carries over to a piano and a
# room training never heard. TimGM6mb's program 2 plays its CP-70 samples, which
# no other allowed timbre uses (its programs 0, 1 and 3 share one set of piano
# samples, FluidR3_GM's 0, 1 and 3 another, FluidR3_GM's 2 a third); the font is
# matched by file name, so pretty_midi's bundled copy serves as well. The room is
# a large live hall, bigger and wetter than any training room (ROOMS).
HELDOUT = {"soundfont": "TimGM6mb.sf2", "program": 2, "gain": 1.0,
           "reverb": {"room-size": 0.95, "damp": 0.1, "width": 1.0, "level": 0.9, "send": 127},
           "chorus": None, "tuning": 0.0}
HELDOUT_DIR = "heldout"
# Training rooms: FluidSynth reverb settings drawn uniformly from these ranges,
# and the MIDI reverb send (CC91). Size, level and send stay below the held-out room's.
ROOMS = {"room-size": (0.1, 0.8), "damp": (0.0, 0.8), "width": (0.3, 1.0), "level": (0.1, 0.6), "send": (0, 100)}
# Training pieces are transposed by up to this many semitones (labels move with them).
TRANSPOSE_SEMITONES = 2
# Version of the corpus a build writes: a generated corpus of another version is rebuilt.
CORPUS_VERSION = 2


def _is_heldout_timbre(soundfont, program):
  return os.path.basename(str(soundfont)) == HELDOUT["soundfont"] and program == HELDOUT["program"]


def render_settings(rng, soundfonts):
  """Per-piece timbre and room: SoundFont, GM piano program, gain, reverb, chorus and tuning.

  Every allowed SoundFont and PIANO_PROGRAMS program may come up, except the HELDOUT
  timbre; rooms come from ROOMS (or none: dry), never the HELDOUT room.
  Returns:
    A JSON-ready dict: reverb and chorus are None (off) or FluidSynth settings plus
    `send`, the MIDI effect send level; `tuning` is in cents (real pianos are seldom
    tuned to A = 440 Hz exactly).
  """
  timbres = [(str(f), p) for f in soundfonts for p in PIANO_PROGRAMS if not _is_heldout_timbre(f, p)]
  soundfont, program = timbres[int(rng.integers(len(timbres)))]
  reverb = None
  if rng.random() < 0.8:
    reverb = {k: round(float(rng.uniform(lo, hi)), 3) for k, (lo, hi) in ROOMS.items() if k != "send"}
    reverb["send"] = int(rng.integers(ROOMS["send"][0], ROOMS["send"][1] + 1))
  chorus = None
  if rng.random() < 0.3:  # a shimmer as of a slightly detuned or modulated instrument
    chorus = {"nr": int(rng.integers(2, 6)), "level": round(float(rng.uniform(0.5, 2.0)), 3),
              "speed": round(float(rng.uniform(0.2, 1.0)), 3), "depth": round(float(rng.uniform(2.0, 10.0)), 3),
              "send": int(rng.integers(20, 101))}
  return {"soundfont": soundfont, "program": program, "gain": round(float(rng.uniform(0.8, 2.0)), 3),
          "reverb": reverb, "chorus": chorus, "tuning": round(float(rng.uniform(-20.0, 20.0)), 1)}


def heldout_settings(soundfonts):
  """HELDOUT with the path of its SoundFont among `soundfonts`, or None when it is not installed."""
  for font in soundfonts:
    if os.path.basename(str(font)) == HELDOUT["soundfont"]:
      return {**HELDOUT, "soundfont": str(font)}
  return None


def transposition(rng, perf):
  """A shift of at most TRANSPOSE_SEMITONES that keeps every note of `perf` within A0..C8."""
  low, high = _PIANO_RANGE
  down = max(-TRANSPOSE_SEMITONES, low - int(perf.pitch.min(initial=high)))
  up = min(TRANSPOSE_SEMITONES, high - int(perf.pitch.max(initial=low)))
  return int(rng.integers(down, up + 1))


def _variant(midi_path, variant_path, settings):
  """Writes the ground truth `midi_path` as it is to be rendered.

  Only its start changes: the program, the effect sends (CC91 reverb, CC93 chorus)
  and the tuning (a pitch bend; the GM bend range is 2 semitones). Notes, pedal
  and timing stay exactly those of the ground truth.
  """
  midi = mido.MidiFile(midi_path)
  for track in midi.tracks:
    for i, msg in enumerate(track):
      if msg.type == "program_change":
        start = [msg.copy(program=settings["program"])]
        for effect, control in (("reverb", 91), ("chorus", 93)):
          if settings[effect]:
            start.append(mido.Message("control_change", channel=msg.channel, control=control,
                                      value=settings[effect]["send"]))
        start.append(mido.Message("pitchwheel", channel=msg.channel, pitch=round(settings["tuning"] / 200 * 8192)))
        track[i:i + 1] = start
        break
  midi.save(variant_path)


def _fluidsynth_options(settings):
  """FluidSynth command-line options for the effects of `settings`."""
  options = []
  for effect, switch in (("reverb", "-R"), ("chorus", "-C")):
    params = settings[effect]
    options += [switch, "1" if params else "0"]
    for key, value in (params or {}).items():
      if key != "send":  # a MIDI controller, set in the rendered MIDI
        options += ["-o", f"synth.{effect}.{key}={value}"]
  return options


def render(midi_path, wav_path, settings, sample_rate, duration):
  """Renders `midi_path` with fluidsynth into a 16-bit mono WAV of exactly `duration` seconds.

  The WAV's comment records `settings` (see _up_to_date).
  """
  soundfont = str(sources.check_not_reserved(settings["soundfont"]))
  # Dynamic sample loading reads only the piano samples: same audio, half the start-up time.
  cmd = ["fluidsynth", "-ni", "-q", "-o", "synth.dynamic-sample-loading=1", "-r", str(sample_rate),
         "-g", str(settings["gain"]), "-O", "float", "-T", "wav"] + _fluidsynth_options(settings)
  with tempfile.TemporaryDirectory(prefix="hiermt-render-") as scratch:
    variant, raw = os.path.join(scratch, "variant.mid"), os.path.join(scratch, "raw.wav")
    _variant(midi_path, variant, settings)
    res = subprocess.run(cmd + ["-F", raw, soundfont, variant], capture_output=True, text=True)
    if res.returncode != 0 or not os.path.exists(raw):
      raise RuntimeError(f"fluidsynth failed on {midi_path} (rc {res.returncode}): {res.stderr[-500:]}")
    audio, rate = soundfile.read(raw, dtype="float32", always_2d=True)  # [samples, channels]
  audio = audio.mean(axis=1)  # [samples]
  num = int(round(duration * sample_rate))
  audio = np.pad(audio[:num], (0, max(0, num - len(audio))))
  peak = float(np.abs(audio).max(initial=0.0))
  if peak > 0.99:  # dense fortissimo: scale down rather than clip
    audio *= 0.99 / peak
  pcm = np.round(audio * 32767).astype(np.int16)
  with atomic_file.atomic_output(wav_path) as tmp:
    with soundfile.SoundFile(tmp, "w", rate, 1, "PCM_16", format="WAV") as f:
      f.comment = _settings_record(settings)
      f.write(pcm)


def _settings_record(settings):
  return json.dumps(settings, sort_keys=True)


def _up_to_date(midi_path, wav_path, data, settings, sample_rate, duration):
  """Whether a previous run already wrote this MIDI and rendered it with these settings, rate and length."""
  if not (os.path.exists(midi_path) and os.path.exists(wav_path)):
    return False
  with open(midi_path, "rb") as f:
    if f.read() != data:
      return False
  with soundfile.SoundFile(wav_path) as f:
    return (f.samplerate == sample_rate and f.frames == int(round(duration * sample_rate))
            and f.comment == _settings_record(settings))


def _check_tools():
  if shutil.which("fluidsynth") is None:
    raise RuntimeError("fluidsynth is not installed: run ./install.sh or `sudo apt-get install fluidsynth`")
  fonts = sources.soundfonts()
  if not fonts:
    raise RuntimeError(
        "no SoundFont found: run ./install.sh or `sudo apt-get install fluid-soundfont-gm timgm6mb-soundfont`")
  return [sources.check_not_reserved(f) for f in fonts]


def is_current(output_dir):
  """Whether `output_dir` holds a complete corpus written by this version of the generator."""
  try:
    with open(os.path.join(output_dir, MANIFEST_NAME), encoding="utf-8") as f:
      version = json.load(f).get("version")
  except (OSError, ValueError):
    return False
  return version == CORPUS_VERSION and os.path.exists(os.path.join(output_dir, maestro.CSV_NAME))


class _Progress:
  """A tqdm bar of whole seconds of audio rendered, never past its total; thread-safe."""

  def __init__(self, total, enabled):
    self._bar = tqdm.tqdm(total=total, unit="s", desc="fetching the miditok MIDIs", disable=not enabled)
    self._seconds = 0.0
    self._lock = threading.Lock()

  def describe(self, text):
    self._bar.set_description(text)

  def advance(self, seconds):
    with self._lock:
      self._seconds += seconds
      self._bar.update(min(int(self._seconds), self._bar.total) - self._bar.n)

  def close(self):
    with self._lock:
      self._bar.update(self._bar.total - self._bar.n)
      self._bar.close()


def _write_corpus_files(output_dir, rows, manifest):
  """The manifest, then the MAESTRO index (whose CSV, written last, marks the folder complete)."""
  with atomic_file.atomic_output(os.path.join(output_dir, MANIFEST_NAME)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1)
  maestro.write_index(output_dir, rows)


def build_corpus(output_dir, minutes=DEFAULT_MINUTES, seed=0, *, sample_rate=16000, workers=2,
                 cache_dir="~/.cache/hiermt", heldout=True, progress=True):
  """Generates a MAESTRO-v3-layout corpus of about `minutes` of piano audio into `output_dir`.

  Pieces are rendered while later ones are still planned. Training pieces are
  transposed (TRANSPOSE_SEMITONES); every piece gets its own render_settings. With
  `heldout`, the test pieces are also rendered with the HELDOUT timbre and room into
  OUTPUT_DIR/heldout, a corpus of its own that lists only them (split "test").

  Re-running with the same arguments keeps pieces whose MIDI is unchanged and whose
  WAV was rendered with the same settings, so an interrupted build resumes where it
  stopped.

  Args:
    output_dir: destination folder (created).
    minutes: total audio length.
    seed: same seed, same MIDI files, settings and splits.
    sample_rate: rate of the written WAVs.
    workers: fluidsynth processes run in parallel.
    cache_dir: cache of the miditok MAESTRO MIDIs.
    heldout: also write the held-out corpus (skipped, with a warning, if its
      SoundFont is not installed).
    progress: show a tqdm bar (seconds of audio rendered).
  Returns:
    output_dir.
  """
  if not minutes > 0:
    raise ValueError(f"minutes must be positive, got {minutes}")
  fonts = _check_tools()
  held = heldout_settings(fonts) if heldout else None
  if heldout and held is None:
    logging.warning("no held-out corpus: its SoundFont %s is not installed", HELDOUT["soundfont"])
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  heldout_dir = os.path.join(output_dir, HELDOUT_DIR)
  os.makedirs(output_dir, exist_ok=True)
  started = time.time()
  skipped, rows, records, heldout_rows, heldout_records, jobs = [], [], [], [], [], []
  bar = _Progress(int(round(minutes * 60 * (1 + (SPLIT_SHARES["test"] if held else 0.0)))), progress)

  def write_and_render(directory, stem, data, settings, duration):
    midi_path, wav_path = os.path.join(directory, stem + ".midi"), os.path.join(directory, stem + ".wav")
    if _up_to_date(midi_path, wav_path, data, settings, sample_rate, duration):
      bar.advance(duration)
      return
    with atomic_file.atomic_output(midi_path) as tmp:
      with open(tmp, "wb") as f:
        f.write(data)
    jobs.append(pool.submit(render, midi_path, wav_path, settings, sample_rate, duration))
    jobs[-1].add_done_callback(lambda _: bar.advance(duration))

  # On a cold cache this fetches the miditok sdist with pip: the one slow step before the first piece.
  sources.miditok_maestro_dir(cache_dir)
  bar.describe("planning and rendering")
  assign = SplitAssigner(seed)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for index, piece in enumerate(plan(minutes, seed, cache_dir, skipped)):
      rng = np.random.default_rng([seed, 1000 + index])
      year = int(YEARS[int(rng.integers(len(YEARS)))])
      settings = render_settings(rng, fonts)
      duration = round(piece.perf.end + TAIL_SECONDS, 3)
      split = assign(duration)
      shift = transposition(rng, piece.perf) if split == "train" else 0
      perf = dataclasses.replace(piece.perf, pitch=piece.perf.pitch + np.int32(shift))
      title = piece.title + (f" transposed {shift:+d}" if shift else "")
      stem = f"{year}/hiermt-{piece.kind}-{index:04d}"
      data = midi_bytes(perf)
      bar.describe(f"planning and rendering ({piece.kind})")
      write_and_render(output_dir, stem, data, settings, duration)
      row = {"canonical_composer": piece.composer, "canonical_title": title, "split": split, "year": year,
             "midi_filename": stem + ".midi", "audio_filename": stem + ".wav", "duration": duration}
      record = {"midi_filename": stem + ".midi", "kind": piece.kind, "source": piece.source,
                "window": [round(w, 3) for w in piece.window], "num_notes": int(len(perf.onset)), "split": split,
                "transpose": shift}
      rows.append(row)
      records.append({**record, **settings})
      if held and split == "test":
        write_and_render(heldout_dir, stem, data, held, duration)
        heldout_rows.append(row)
        heldout_records.append({**record, **held})
    for job in jobs:
      job.result()  # re-raises a failed render
  bar.close()
  if not rows:
    raise RuntimeError(f"no piece could be generated ({len(skipped)} sources skipped: {skipped})")
  common = {"version": CORPUS_VERSION, "minutes": minutes, "seed": seed, "sample_rate": sample_rate}
  if held:
    _write_corpus_files(heldout_dir, heldout_rows, {**common, "heldout": held, "pieces": heldout_records})
  _write_corpus_files(output_dir, rows, {**common, "skipped_sources": skipped,
                                         "heldout": {"dir": HELDOUT_DIR, **held} if held else None,
                                         "pieces": records})
  seconds = sum(r["duration"] for r in rows + heldout_rows)
  wall = time.time() - started
  logging.info("%s: %d pieces (+%d held-out renderings), %.1f min of audio in %.1f s (%.0fx real time), "
               "%d sources skipped", output_dir, len(rows), len(heldout_rows), seconds / 60, wall,
               seconds / max(wall, 1e-9), len(skipped))
  return output_dir


def _define_flags():
  # Defined only when run as a script: library imports must not claim global flag names.
  flags.DEFINE_string("output_dir", None, "Folder to write the MAESTRO-layout corpus into.", required=True)
  flags.DEFINE_float("minutes", DEFAULT_MINUTES, "Minutes of audio to generate.")
  flags.DEFINE_integer("seed", 0, "Random seed: same seed, same corpus.")
  flags.DEFINE_integer("sample_rate", 16000, "Sample rate of the written WAVs.")
  flags.DEFINE_integer("workers", 2, "fluidsynth processes run in parallel.")
  flags.DEFINE_string("cache_dir", "~/.cache/hiermt", "Cache of the miditok MAESTRO MIDIs.")
  flags.DEFINE_bool("heldout", True, f"Also render the test pieces with the held-out timbre and room into "
                    f"OUTPUT_DIR/{HELDOUT_DIR}.")


def main(argv):
  command_logging.hiermt_info_only()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  started = time.time()
  args = flags.FLAGS
  out = build_corpus(args.output_dir, args.minutes, args.seed, sample_rate=args.sample_rate,
                     workers=args.workers, cache_dir=args.cache_dir, heldout=args.heldout)
  index = maestro.load_index(out)
  with open(os.path.join(out, MANIFEST_NAME), encoding="utf-8") as f:
    manifest = json.load(f)
  seconds = sum(p.duration for p in index)
  wall = time.time() - started
  per_split = {s: sum(p.split == s for p in index) for s in maestro.SPLITS}
  print(f"{out}: {len(index)} pieces {per_split}, {seconds / 60:.1f} min of audio in {wall:.1f} s "
        f"({seconds / wall:.0f}x real time); {len(manifest['skipped_sources'])} unreadable sources skipped")
  if manifest["heldout"]:
    print(f"held-out timbre and room: the {per_split['test']} test pieces in {os.path.join(out, HELDOUT_DIR)} "
          f"(evaluate with --data_dir={os.path.join(out, HELDOUT_DIR)})")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
