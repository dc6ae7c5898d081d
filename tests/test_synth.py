"""The generated corpus: layout, ground truth, determinism, and that reserved material stays out."""

import json
import os

import numpy as np
import pretty_midi
import pytest
import soundfile

from hiermt import notes
from hiermt.data import maestro
from hiermt.data import sources
from hiermt.data import synth

MINUTES = 0.3  # about 18 s of audio, in 5-7 pieces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A tiny corpus, built while recording every path that went through the reserved-material gate."""
  checked = []
  real_check = sources.check_not_reserved

  def recording_check(path):
    checked.append(str(path))
    return real_check(path)

  out = str(tmp_path_factory.mktemp("corpus"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sources, "check_not_reserved", recording_check)
    assert synth.build_corpus(out, MINUTES, seed=0, progress=False) == out
  with open(os.path.join(out, synth.MANIFEST_NAME)) as f:
    manifest = json.load(f)
  return out, checked, manifest


def _perf(notes_list, pedal=()):
  return synth.Performance.from_lists(notes_list, list(pedal))


def test_layout(corpus):
  out, _, manifest = corpus
  index = maestro.load_index(out)  # resolves every file, so all pairs exist
  assert len(index) >= 3 and len(index) == len(manifest["pieces"])
  assert {p.split for p in index} == set(maestro.SPLITS)
  os.remove(os.path.join(out, maestro.CSV_NAME))  # the JSON index says the same
  try:
    assert maestro.load_index(out) == index
  finally:
    maestro.write_index(out, [{k: getattr(p, k) for k in maestro.FIELDS} for p in index])
  for p in index:
    assert p.year in synth.YEARS and p.midi_filename.startswith(f"{p.year}/")
    assert p.midi_filename.endswith(".midi") and p.audio_filename == p.midi_filename[:-5] + ".wav"
    info = soundfile.info(p.audio_path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.frames == round(p.duration * 16000)
  total = sum(p.duration for p in index)
  assert MINUTES * 60 * 0.8 < total < MINUTES * 60 * 1.5
  assert {r["kind"] for r in manifest["pieces"]} == set(synth.KIND_SHARES)
  leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
  assert not leftovers


def test_midi_is_the_ground_truth_of_the_audio(corpus):
  out, _, _ = corpus
  pedalled = 0
  for p in maestro.load_index(out):
    midi = pretty_midi.PrettyMIDI(p.midi_path)
    assert [i.program for i in midi.instruments] == [0]
    pedalled += any(c.number == 64 for c in midi.instruments[0].control_changes)
    truth = notes.read_midi(p.midi_path)
    assert len(truth) > 0 and truth.offset.max() <= p.duration
    assert truth.pitch.min() >= 21 and truth.pitch.max() <= 108
    audio, rate = soundfile.read(p.audio_path)
    first = truth.onset.min()
    # Silence until the first MIDI note, sound right after it: audio and MIDI are aligned.
    before = audio[:max(int((first - 0.01) * rate), 0)]
    after = audio[int(first * rate):int((first + 0.1) * rate)]
    assert np.abs(before).max(initial=0.0) < 1e-3
    assert np.abs(after).max() > 1e-2
  assert pedalled > 0


def test_same_seed_same_corpus_and_resume(corpus):
  out, _, _ = corpus
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)
  before = {f: open(f, "rb").read() for f in files if f.endswith((".midi", ".csv"))}
  wav_times = {f: os.stat(f).st_mtime_ns for f in files if f.endswith(".wav")}
  synth.build_corpus(out, MINUTES, seed=0, progress=False)
  assert {f: open(f, "rb").read() for f in before} == before
  # Identical MIDI is not rendered again.
  assert {f: os.stat(f).st_mtime_ns for f in wav_times} == wav_times
  other = next(synth.plan(MINUTES, seed=1))
  first = next(synth.plan(MINUTES, seed=0))
  assert synth.midi_bytes(other.perf) != synth.midi_bytes(first.perf)


def test_every_source_and_soundfont_passes_the_gate(corpus):
  _, checked, manifest = corpus
  for record in manifest["pieces"]:
    if record["kind"] != "procedural":
      assert record["source"] in checked
    assert record["soundfont"] in checked
    sources.check_not_reserved(record["source"])  # raises if it were reserved
    sources.check_not_reserved(record["soundfont"])
  assert not any(n in s for s in checked for n in sources.RESERVED_MIDITOK)


def test_reserved_material_is_refused(monkeypatch, tmp_path):
  # A path with a reserved name (never read: the gate must refuse it first).
  monkeypatch.setattr(sources, "allowed_maestro_midis", lambda cache_dir: [tmp_path / "Maestro_2.mid"])
  with pytest.raises(sources.ReservedMaterialError):
    next(synth.plan(MINUTES, seed=0))
  monkeypatch.setattr(sources, "soundfonts", lambda: ["/usr/share/sounds/sf2/MuseScore_General.sf2"])
  with pytest.raises(sources.ReservedMaterialError):
    synth.build_corpus("/nonexistent/never/written", MINUTES, progress=False)


def test_music21_candidates_exclude_reserved_works():
  groups = synth.music21_candidates()
  paths = [p for ps in groups.values() for p in ps]
  assert len(paths) > 100 and "bach" in groups and "beethoven" in groups
  for name in list(sources.RESERVED_MUSIC21_COMPOSERS) + list(sources.RESERVED_MUSIC21_WORKS):
    assert not any(f"/{name}" in p.lower() for p in paths), name


def test_unreadable_source_midi_is_skipped_and_counted(monkeypatch, tmp_path):
  broken = tmp_path / "Maestro_1.mid"
  broken.write_bytes(b"MThd not really a midi file")
  real = sources.allowed_maestro_midis("~/.cache/hiermt")[0]
  monkeypatch.setattr(sources, "allowed_maestro_midis", lambda cache_dir: [broken, real])
  monkeypatch.setattr(synth, "KIND_SHARES", {"maestro": 1.0})
  skipped = []
  pieces = list(synth.plan(0.2, seed=0, skipped=skipped))
  assert skipped == [str(broken)]
  assert pieces and {p.source for p in pieces} == {str(real)}


def test_clean_makes_unambiguous_notes():
  perf = _perf([(0.0, 1.0, 60, 80), (0.01, 0.5, 60, 100),  # unison struck together: merged
                (0.5, 2.0, 62, 70), (1.0, 1.5, 62, 70),  # overlapping re-strike: first one cut
                (2.0, 2.5, 10, 200), (2.0, 2.5, 120, 0)])  # out of range pitch and velocity
  out = synth.clean(perf)
  np.testing.assert_array_equal(out.pitch, [60, 62, 62, 22, 108])
  np.testing.assert_allclose(out.offset[:3], [1.0, 0.99, 1.5])
  np.testing.assert_array_equal(out.velocity, [100, 70, 70, 127, 1])
  assert np.all(np.diff(out.onset) >= 0)


def test_excerpt_carries_pedal_and_cuts_notes():
  perf = _perf([(1.0, 2.0, 60, 80), (2.5, 9.0, 64, 80), (8.0, 9.0, 67, 80)],
               [(0.5, 127), (3.0, 0), (4.0, 100)])
  out = synth.excerpt(perf, 2.0, 6.0)
  np.testing.assert_array_equal(out.pitch, [64])
  np.testing.assert_allclose([out.onset[0], out.offset[0]], [0.5, 4.0])
  np.testing.assert_allclose(out.pedal_time, [0.0, 1.0, 2.0, 4.0])
  np.testing.assert_array_equal(out.pedal_value, [127, 0, 100, 0])


def test_procedural_music_is_varied():
  rng = np.random.default_rng(0)
  perf = synth.procedural_performance(rng, 40.0)
  assert perf.end == pytest.approx(40.0) and len(perf.onset) > 100
  assert perf.pitch.max() - perf.pitch.min() >= 36
  assert perf.velocity.max() - perf.velocity.min() >= 50
  assert len(perf.pedal_time) > 2
  assert np.any(np.diff(perf.onset) > 0)


def test_split_assignment():
  durations = np.random.default_rng(0).uniform(10, 90, 60)
  splits = synth.assign_splits(durations, seed=0)
  assert splits == synth.assign_splits(durations, seed=0)
  share = {s: durations[np.array(splits) == s].sum() / durations.sum() for s in maestro.SPLITS}
  assert share["train"] == pytest.approx(0.8, abs=0.03)
  assert share["validation"] == pytest.approx(0.1, abs=0.03) and share["test"] == pytest.approx(0.1, abs=0.03)
  assert sorted(synth.assign_splits([100.0, 1.0, 1.0], seed=5)) == ["test", "train", "validation"]


def test_bad_minutes():
  with pytest.raises(ValueError, match="minutes"):
    synth.build_corpus("/nonexistent/never/written", 0)
