"""Converts a MAESTRO-layout folder into a random-access store for the data loader.

  python -m hiermt.data.prepare --data_dir=DIR [--prepared_dir=OUT] [--workers=2]

Per piece, the store holds `<id>.npy` (16 kHz mono int16 audio, memory-mappable)
and `<id>.npz` (the sustain-extended notes of `notes.read_midi`, plus a record
of the sources it was made from). `index.json`, written last, lists the pieces
of each split. The default location is DATA_DIR/hiermt_prepared.

Re-running skips pieces whose sources are unchanged; unreadable audio or MIDI
is skipped with a warning and listed in the index under "failed".
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import zipfile

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tqdm

from hiermt import atomic_file
from hiermt import audio
from hiermt import command_logging
from hiermt import notes as notes_lib
from hiermt.data import maestro

PREPARED_NAME = "hiermt_prepared"
INDEX_NAME = "index.json"
FORMAT_VERSION = 1


def default_prepared_dir(data_dir):
  """Where the store of `data_dir` lives when no prepared_dir is given."""
  return os.path.join(os.path.abspath(os.path.expanduser(data_dir)), PREPARED_NAME)


def _stat(path):
  """(size, mtime_ns): changes whenever the file is rewritten."""
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def _source_record(piece, data_dir, sample_rate):
  """What a prepared piece was made from; a mismatch means it must be prepared again."""
  return {"version": FORMAT_VERSION, "sample_rate": sample_rate,
          "audio": os.path.relpath(piece.audio_path, data_dir), "audio_stat": _stat(piece.audio_path),
          "midi": os.path.relpath(piece.midi_path, data_dir), "midi_stat": _stat(piece.midi_path)}


def _paths(prepared_dir, piece_id):
  stem = os.path.join(prepared_dir, *piece_id.split("/"))
  return stem + ".npy", stem + ".npz"


def _read_record(npz_path):
  """(source record, num_samples) of a prepared piece, or None when absent or unreadable."""
  try:
    with np.load(npz_path) as z:
      return json.loads(str(z["source"])), int(z["num_samples"])
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None


def _prepare_piece(task):
  """Writes one piece's audio and notes. Runs in a worker process.

  Returns:
    (piece_id, num_samples, error): error is None on success, else a message.
  """
  piece_id, audio_path, midi_path, npy_path, npz_path, record = task
  try:
    wave = audio.load_audio(audio_path, record["sample_rate"])  # [samples] float32 in [-1, 1]
    piece_notes = notes_lib.read_midi(midi_path)
  except (audio.AudioError, notes_lib.MidiError) as e:
    return piece_id, 0, str(e)
  pcm = np.round(wave * 32767.0).astype(np.int16)  # [samples]
  with atomic_file.atomic_output(npy_path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, pcm)
  # The npz goes last: it is what marks the piece as prepared.
  with atomic_file.atomic_output(npz_path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, onset=piece_notes.onset, offset=piece_notes.offset, pitch=piece_notes.pitch,
               velocity=piece_notes.velocity, num_samples=np.int64(len(pcm)), source=np.array(json.dumps(record)))
  return piece_id, len(pcm), None


@dataclasses.dataclass
class Summary:
  """What a `prepare` run did."""

  prepared_dir: str
  prepared: int  # pieces (re)written
  kept: int  # pieces already up to date
  failed: list  # [(piece_id, message)] unreadable audio or MIDI


def prepare(data_dir, prepared_dir="", *, workers=2, sample_rate=audio.SAMPLE_RATE, progress=True):
  """Builds or updates the store of `data_dir`.

  Args:
    data_dir: a MAESTRO-layout folder.
    prepared_dir: the store; empty means DATA_DIR/hiermt_prepared.
    workers: processes decoding pieces (0 or 1: in this process).
    sample_rate: audio rate of the store.
    progress: show a tqdm bar.
  Returns:
    A Summary.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  prepared_dir = os.path.abspath(os.path.expanduser(prepared_dir)) if prepared_dir else default_prepared_dir(data_dir)
  pieces = maestro.load_index(data_dir)
  ids = [p.piece_id for p in pieces]
  if len(set(ids)) != len(ids):
    dup = sorted({i for i in ids if ids.count(i) > 1})
    raise ValueError(f"{maestro.index_path(data_dir)} lists these MIDI files more than once: {dup[:5]}")

  num_samples, tasks = {}, []
  for piece in pieces:
    record = _source_record(piece, data_dir, sample_rate)
    npy_path, npz_path = _paths(prepared_dir, piece.piece_id)
    existing = _read_record(npz_path)
    if existing and existing[0] == record and os.path.exists(npy_path):
      num_samples[piece.piece_id] = existing[1]
    else:
      tasks.append((piece.piece_id, piece.audio_path, piece.midi_path, npy_path, npz_path, record))

  failed = []
  bar = tqdm.tqdm(total=len(tasks), unit="piece", desc="preparing", disable=not progress or not tasks)
  if workers > 1 and len(tasks) > 1:
    # spawn: the parent may already run JAX threads, which fork would copy in a broken state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
      results = pool.map(_prepare_piece, tasks)
      for result in results:
        bar.update(1)
        _collect(result, num_samples, failed)
  else:
    for task in tasks:
      _collect(_prepare_piece(task), num_samples, failed)
      bar.update(1)
  bar.close()

  splits = {s: [] for s in maestro.SPLITS}
  for piece in pieces:
    if piece.piece_id in num_samples:
      n = num_samples[piece.piece_id]
      splits[piece.split].append({
          "id": piece.piece_id, "duration": n / sample_rate, "num_samples": n, "audio": piece.audio_path,
          "midi": piece.midi_path, "composer": piece.canonical_composer, "title": piece.canonical_title})
  index_file = maestro.index_path(data_dir)
  index = {"version": FORMAT_VERSION, "sample_rate": sample_rate, "data_dir": data_dir,
           "maestro_index": index_file, "maestro_index_stat": _stat(index_file), "splits": splits,
           "failed": [{"id": i, "error": e} for i, e in failed]}
  with atomic_file.atomic_output(os.path.join(prepared_dir, INDEX_NAME)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(index, f, indent=1)
  summary = Summary(prepared_dir, prepared=len(tasks) - len(failed), kept=len(pieces) - len(tasks), failed=failed)
  logging.info("%s: %d pieces prepared, %d already up to date, %d skipped as unreadable", prepared_dir,
               summary.prepared, summary.kept, len(failed))
  return summary


def _collect(result, num_samples, failed):
  piece_id, n, error = result
  if error is None:
    num_samples[piece_id] = n
  else:
    logging.warning("skipping piece %s: %s", piece_id, error)
    failed.append((piece_id, error))


def ensure_prepared(data_dir, prepared_dir="", *, workers=2, sample_rate=audio.SAMPLE_RATE):
  """The store of `data_dir`, preparing it first unless it matches the current MAESTRO index.

  Returns:
    The prepared_dir (absolute).
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  prepared_dir = os.path.abspath(os.path.expanduser(prepared_dir)) if prepared_dir else default_prepared_dir(data_dir)
  try:
    with open(os.path.join(prepared_dir, INDEX_NAME), encoding="utf-8") as f:
      index = json.load(f)
    index_file = maestro.index_path(data_dir)
    if (index.get("version") == FORMAT_VERSION and index.get("sample_rate") == sample_rate
        and index.get("maestro_index") == index_file and index.get("maestro_index_stat") == _stat(index_file)):
      return prepared_dir
  except (OSError, ValueError):
    pass  # no usable index yet
  prepare(data_dir, prepared_dir, workers=workers, sample_rate=sample_rate)
  return prepared_dir


class Store:
  """Random access to one split of a prepared store.

  Picklable (Grain workers): memory maps are opened lazily, cached per process
  and never pickled.

  Attributes:
    prepared_dir: the store folder.
    split: the split served.
    sample_rate: audio rate of the store.
  """

  def __init__(self, prepared_dir, split):
    self.prepared_dir = os.path.abspath(os.path.expanduser(prepared_dir))
    self.split = split
    path = os.path.join(self.prepared_dir, INDEX_NAME)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path} does not exist: prepare the data first with "
          f"`python -m hiermt.data.prepare --data_dir=DATA_DIR --prepared_dir={self.prepared_dir}`")
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
    if split not in index["splits"]:
      raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(index['splits'])}")
    self.sample_rate = index["sample_rate"]
    self._entries = index["splits"][split]
    self._audio = {}

  def __len__(self):
    return len(self._entries)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_audio"] = {}  # memory maps are per process
    return state

  @property
  def piece_ids(self):
    """Ids of the pieces, in index order."""
    return [e["id"] for e in self._entries]

  def audio(self, i):
    """Piece `i` as int16 [samples] (a read-only memory map)."""
    if i not in self._audio:
      self._audio[i] = np.load(_paths(self.prepared_dir, self._entries[i]["id"])[0], mmap_mode="r")
    return self._audio[i]

  def notes(self, i):
    """The sustain-extended notes of piece `i`."""
    with np.load(_paths(self.prepared_dir, self._entries[i]["id"])[1]) as z:
      return notes_lib.Notes(z["onset"], z["offset"], z["pitch"], z["velocity"])

  def duration(self, i):
    """Length of piece `i` in seconds."""
    return self._entries[i]["duration"]

  def num_samples(self, i):
    """Length of piece `i` in samples."""
    return self._entries[i]["num_samples"]


def _define_flags():
  # Defined only when run as a script: library imports must not claim global flag names.
  flags.DEFINE_string("data_dir", None, "MAESTRO-layout folder to prepare.", required=True)
  flags.DEFINE_string("prepared_dir", "", "Store folder; empty means DATA_DIR/hiermt_prepared.")
  flags.DEFINE_integer("workers", 2, "Processes decoding pieces.")


def main(argv):
  command_logging.hiermt_info_only()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = flags.FLAGS
  summary = prepare(args.data_dir, args.prepared_dir, workers=args.workers)
  print(f"{summary.prepared_dir}: {summary.prepared} pieces prepared, {summary.kept} already up to date, "
        f"{len(summary.failed)} skipped as unreadable")
  for piece_id, error in summary.failed:
    print(f"  skipped {piece_id}: {error}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
