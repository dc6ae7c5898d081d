"""The generated corpus: layout, ground truth, determinism, rendering variety, the held-out corpus,
and that reserved material stays out."""

import json
import os
import re

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
  # Identical MIDI is not rendered again, unless its rendering settings changed.
  assert {f: os.stat(f).st_mtime_ns for f in wav_times} == wav_times
  record = next(r for r in json.load(open(os.path.join(out, synth.MANIFEST_NAME)))["pieces"])
  midi, settings = os.path.join(out, record["midi_filename"]), {k: record[k] for k in synth.HELDOUT}
  args = (midi, midi[:-5] + ".wav", open(midi, "rb").read())
  duration = soundfile.info(midi[:-5] + ".wav").frames / 16000
  assert synth._up_to_date(*args, settings, 16000, duration)  # pylint: disable=protected-access
  assert not synth._up_to_date(*args, {**settings, "gain": settings["gain"] + 0.1}, 16000, duration)  # pylint: disable=protected-access
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
  assign = lambda ds, seed: [a(d) for a in [synth.SplitAssigner(seed)] for d in ds]
  splits = assign(durations, 0)
  assert splits == assign(durations, 0)
  share = {s: durations[np.array(splits) == s].sum() / durations.sum() for s in maestro.SPLITS}
  assert share["train"] == pytest.approx(0.8, abs=0.03)
  assert share["validation"] == pytest.approx(0.1, abs=0.03) and share["test"] == pytest.approx(0.1, abs=0.03)
  assert sorted(assign([100.0, 1.0, 1.0], 5)) == ["test", "train", "validation"]


def test_bad_minutes():
  with pytest.raises(ValueError, match="minutes"):
    synth.build_corpus("/nonexistent/never/written", 0)


# ---------------------------------------------------------------------------
# Rendering variety, transposition and the held-out timbre and room
# ---------------------------------------------------------------------------


def _heldout_room(reverb):
  return reverb is not None and {k: reverb[k] for k in synth.HELDOUT["reverb"]} == synth.HELDOUT["reverb"]


@pytest.mark.parametrize("fonts", [["/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/TimGM6mb.sf2"],
                                   ["/venv/pretty_midi/TimGM6mb.sf2"]])  # the pip-only fallback
def test_render_settings_vary_but_never_use_the_heldout_timbre_or_room(fonts):
  rng = np.random.default_rng(0)
  settings = [synth.render_settings(rng, fonts) for _ in range(3000)]
  timbres = {(s["soundfont"], s["program"]) for s in settings}
  assert len(timbres) == len(fonts) * len(synth.PIANO_PROGRAMS) - 1  # every font and program but the held-out one
  for s in settings:
    assert not (os.path.basename(s["soundfont"]) == synth.HELDOUT["soundfont"]
                and s["program"] == synth.HELDOUT["program"]), s
    assert s["program"] in synth.PIANO_PROGRAMS and not _heldout_room(s["reverb"])
    if s["reverb"]:
      assert s["reverb"]["room-size"] < synth.HELDOUT["reverb"]["room-size"]
      assert s["reverb"]["level"] < synth.HELDOUT["reverb"]["level"]
  assert 0.1 < np.mean([s["reverb"] is None for s in settings]) < 0.3
  assert 0.2 < np.mean([s["chorus"] is not None for s in settings]) < 0.4
  assert len({s["tuning"] for s in settings}) > 100 and max(abs(s["tuning"]) for s in settings) <= 20
  assert synth.heldout_settings(fonts)["soundfont"] == fonts[-1]


def test_the_rendered_midi_differs_from_the_ground_truth_only_in_its_first_events(tmp_path):
  truth = tmp_path / "truth.midi"
  truth.write_bytes(synth.midi_bytes(_perf([(0.5, 1.0, 60, 80), (0.75, 2.0, 72, 90)], [(0.6, 127), (1.5, 0)])))
  settings = {"soundfont": "unused.sf2", "program": 3, "gain": 1.0, "reverb": {"room-size": 0.5, "send": 40},
              "chorus": {"nr": 3, "send": 70}, "tuning": -15.0}
  synth._variant(str(truth), str(tmp_path / "variant.mid"), settings)  # pylint: disable=protected-access
  a, b = pretty_midi.PrettyMIDI(str(truth)), pretty_midi.PrettyMIDI(str(tmp_path / "variant.mid"))
  assert [i.program for i in a.instruments] == [0] and [i.program for i in b.instruments] == [3]
  assert [(n.start, n.end, n.pitch, n.velocity) for n in a.instruments[0].notes] == \
      [(n.start, n.end, n.pitch, n.velocity) for n in b.instruments[0].notes]
  controls = {c.number: c.value for c in b.instruments[0].control_changes if c.time == 0}
  assert controls[91] == 40 and controls[93] == 70
  assert [(p.time, p.pitch) for p in b.instruments[0].pitch_bends] == [(0.0, round(-15 / 200 * 8192))]


def test_transposition_stays_on_the_keyboard():
  rng = np.random.default_rng(0)
  wide = _perf([(0.0, 1.0, 22, 80), (0.0, 1.0, 107, 80)])
  assert {synth.transposition(rng, wide) for _ in range(200)} == {-1, 0, 1}
  low = _perf([(0.0, 1.0, 21, 80), (0.0, 1.0, 60, 80)])
  assert {synth.transposition(rng, low) for _ in range(200)} == {0, 1, 2}
  assert {synth.transposition(rng, _perf([(0.0, 1.0, 60, 80)])) for _ in range(200)} == set(range(-2, 3))


def test_training_pieces_are_transposed_and_their_labels_with_them(corpus):
  out, _, manifest = corpus
  planned = list(synth.plan(MINUTES, seed=0))
  assert len(planned) == len(manifest["pieces"])
  for piece, record in zip(planned, manifest["pieces"]):
    shift = record["transpose"]
    if record["split"] == "train":
      assert abs(shift) <= synth.TRANSPOSE_SEMITONES
    else:
      assert shift == 0
    written = pretty_midi.PrettyMIDI(os.path.join(out, record["midi_filename"])).instruments[0].notes
    np.testing.assert_array_equal(sorted(n.pitch for n in written), np.sort(piece.perf.pitch + shift))
  assert any(r["transpose"] for r in manifest["pieces"])


def test_heldout_corpus_renders_only_the_test_pieces_with_the_heldout_timbre_and_room(corpus):
  out, checked, manifest = corpus
  heldout_dir = os.path.join(out, synth.HELDOUT_DIR)
  test = maestro.pieces(out, "test")
  heldout = maestro.load_index(heldout_dir)
  assert test and [p.midi_filename for p in heldout] == [p.midi_filename for p in test]
  assert {p.split for p in heldout} == {"test"}
  with open(os.path.join(heldout_dir, synth.MANIFEST_NAME)) as f:
    settings = json.load(f)["heldout"]
  assert settings == {**synth.HELDOUT, "soundfont": settings["soundfont"]}
  assert manifest["heldout"] == {"dir": synth.HELDOUT_DIR, **settings}
  assert os.path.basename(settings["soundfont"]) == synth.HELDOUT["soundfont"] and settings["soundfont"] in checked
  for h, p in zip(heldout, test):
    assert open(h.midi_path, "rb").read() == open(p.midi_path, "rb").read()  # the same ground truth
    with soundfile.SoundFile(h.audio_path) as f:
      assert json.loads(f.comment) == settings and f.frames == round(p.duration * 16000)
    assert not np.array_equal(soundfile.read(h.audio_path)[0], soundfile.read(p.audio_path)[0])
  assert synth.is_current(heldout_dir) and synth.is_current(out)


def test_a_corpus_of_another_version_is_not_current(tmp_path):
  (tmp_path / synth.MANIFEST_NAME).write_text(json.dumps({"version": synth.CORPUS_VERSION - 1}))
  (tmp_path / maestro.CSV_NAME).write_text("")
  assert not synth.is_current(str(tmp_path))
  (tmp_path / synth.MANIFEST_NAME).write_text(json.dumps({"version": synth.CORPUS_VERSION}))
  assert synth.is_current(str(tmp_path))
  assert not synth.is_current(str(tmp_path / "missing"))


def test_progress_counts_whole_seconds_and_never_passes_its_total(capsys):
  progress = synth._Progress(10, enabled=True)  # pylint: disable=protected-access
  progress.advance(3.7)
  progress.advance(0.6)
  assert progress._bar.n == 4  # pylint: disable=protected-access
  progress.advance(40.141000000000005)
  assert progress._bar.n == 10  # pylint: disable=protected-access
  progress.close()
  # tqdm's [elapsed<left, rate] field is timing, not the count: a rate like 335544.32s/s holds "4.3".
  shown = re.sub(r"\[[^\]]*\]", "[]", capsys.readouterr().err)
  assert "10/10" in shown and "40.14" not in shown and "4.3" not in shown
  assert {int(n) for n in re.findall(r"(\S+)/10\b", shown)} <= set(range(11))  # whole seconds, <= total
