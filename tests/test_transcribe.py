"""End to end: stages overfitted on one short piece transcribe it back; the CLI's files and errors."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import soundfile

from conftest import load_base_config
from hiermt import checkpoint
from hiermt import metrics
from hiermt import notes as notes_lib
from hiermt import objectives
from hiermt import partitioning
from hiermt import train
from hiermt import transcribe
from hiermt import vocabulary as vocab
from hiermt.models import transcriber

_ROOT = pathlib.Path(__file__).resolve().parents[1]
SECONDS = 18.5  # two segments, the second zero-padded
MAX_TOKENS = 96
STAGES = ("onset_pitch", "velocity", "offset", "flatten")
# Every stage's loss is below 0.01 after 50 steps (measured; 0.002 after 100).
STEPS = 100
SAMPLE_RATE = 16000


def _piece():
  """Notes crossing the 10 s boundary (one of them sounding to the end of the audio), a chord,
  repeated pitches and several velocities."""
  rows = [(0.50, 1.20, 60, 80), (0.50, 1.20, 64, 70), (1.30, 2.00, 67, 90), (2.00, 4.00, 48, 50),
          (3.10, 3.50, 72, 100), (4.00, 5.00, 60, 60), (5.50, 7.00, 55, 75), (6.20, 6.80, 79, 110),
          (7.50, 8.00, 62, 40), (8.40, 12.30, 43, 65), (9.20, 10.00, 74, 85), (9.70, 11.10, 69, 95),
          (10.40, 11.00, 57, 55), (11.50, 12.00, 76, 105), (12.60, 14.00, 52, 45), (13.20, 13.80, 83, 120),
          (14.50, 15.30, 59, 70), (15.00, 15.60, 71, 80), (16.10, 18.50, 47, 60), (17.00, 17.40, 64, 90)]
  return notes_lib.Notes.create(*(np.array(c) for c in zip(*rows)))


def _synthesize(notes, seconds):
  """Decaying three-harmonic tones: a stand-in for a piano, enough for a frozen encoder to tell segments apart."""
  t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
  audio = np.zeros_like(t)
  for on, off, pitch, velocity in zip(notes.onset, notes.offset, notes.pitch, notes.velocity):
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    held = (t >= on) & (t < off)
    tone = sum(np.sin(2 * np.pi * h * f0 * (t - on)) / h for h in (1, 2, 3))
    audio += held * tone * np.exp(-3 * np.maximum(t - on, 0)) * velocity / 127
  return (0.2 * audio / np.abs(audio).max()).astype(np.float32)


def _stage_config(stage, cache_dir):
  config = load_base_config().get_config(f"{stage},runlocal")
  config.freeze_encoder, config.init_from = True, "none"
  config.data.max_tokens, config.data.cache_dir = MAX_TOKENS, cache_dir
  config.train.lr = 3e-3
  return config


def _overfit(workdir, audio, piece, cache_dir):
  """Trains each LM stage's decoder (frozen random encoder) on the piece's segments; writes the stages.

  The four stages' models are one and the same module (same sizes and max_tokens): they start
  from one initial state, read one encoding of the audio and train with one compiled step; only
  their token batches differ.
  """
  configs = {stage: _stage_config(stage, cache_dir) for stage in STAGES}
  model = transcriber.build_model(configs["onset_pitch"])
  assert all(transcriber.build_model(c) == model for c in configs.values())
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  tx = train.make_optimizer(configs["onset_pitch"])
  initial, _ = train.create_state(model, configs["onset_pitch"], tx, mesh, jax.random.key(0))
  count = vocab.num_segments(piece)
  samples = transcribe.SEGMENT_SAMPLES
  segments = np.pad(audio, (0, count * samples - len(audio))).reshape(count, samples)
  # Jitted: compiling the encoder once costs less than running it op by op.
  features = jax.jit(lambda v, a: model.apply(v, a, method=lambda m, x: m.encode(x)))(
      {"params": initial.params, "batch_stats": initial.batch_stats}, segments)  # [segments, frames, d_enc]

  def step(state, batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["tokens"], features, method=lambda m, t, f: m.decoder(t, f))
      return objectives.token_loss(logits, batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  batches = {}
  for stage in STAGES:
    encoded = [vocab.pad(*vocab.encode_segment(piece, k * vocab.SEGMENT_SECONDS, stage), MAX_TOKENS)
               for k in range(count)]
    assert not any(truncated for _, _, truncated in encoded)
    batches[stage] = {"tokens": np.stack([e[0] for e in encoded]), "loss_mask": np.stack([e[1] for e in encoded])}
  # It runs STEPS x 4 times: XLA's backend optimisations (off for the tests, conftest.py) pay here.
  compiled = jax.jit(step).lower(initial, batches["onset_pitch"]).compile(
      compiler_options={"xla_backend_optimization_level": 3})
  for stage, config in configs.items():
    state = initial
    for _ in range(STEPS):
      state, loss = compiled(state, batches[stage])
    assert float(loss) < 0.05, f"{stage} did not overfit (loss {float(loss):.3f})"
    checkpoint.write_stage(checkpoint.stage_dir(workdir, stage), config, state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, wav path, reference notes): onset_pitch, velocity, offset and flatten overfitted."""
  root = tmp_path_factory.mktemp("e2e")
  piece = _piece()
  audio = _synthesize(piece, SECONDS)
  _overfit(root / "run", audio, piece, str(root / "cache"))
  wav = root / "piece.wav"
  soundfile.write(wav, audio, SAMPLE_RATE)
  return root / "run", wav, notes_lib.quantize(piece)


@functools.cache
def _loaded(workdir, layout, dtype=None):
  return transcribe.load(workdir, layout, batch_segments=2, dtype=dtype)


# bfloat16 decoders (`--dtype=bfloat16`) read the same float32 checkpoints: trained decisions survive it.
@pytest.mark.parametrize("layout,dtype", [("hierarchy", None), ("flatten", None), ("hierarchy", "bfloat16")])
def test_overfitted_stages_transcribe_the_piece(trained, layout, dtype):
  workdir, wav, reference = trained
  t = _loaded(str(workdir), layout, dtype)
  estimate = t.transcribe(str(wav))
  scores = metrics.note_metrics(reference, estimate)
  assert scores["onset_f1"] >= 0.95, scores
  assert scores["onset_offset_velocity_f1"] >= 0.9, scores
  assert estimate.offset.max() <= SECONDS  # the note sounding at the end ends with the audio
  if layout == "hierarchy":
    assert t.last_chain and all(segments == 2 for _, _, segments in t.last_chain)
    # The stages were trained with one frozen encoder: it runs once per chunk for all three.
    assert set(t.encoder_of.values()) == {"onset_pitch"}


def test_min_pitch_prob_comes_from_the_config_unless_given(trained):
  workdir, _, _ = trained
  assert _loaded(str(workdir), "hierarchy").stages["onset_pitch"].min_pitch_prob == 0.0  # the config's default
  assert transcribe.load(str(workdir), "hierarchy", min_pitch_prob=0.3).stages["onset_pitch"].min_pitch_prob == 0.3
  with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
    transcribe.load(str(workdir), "hierarchy", min_pitch_prob=1.5)


def test_stages_with_different_encoders_run_their_own(trained):
  import copy
  workdir, _, _ = trained
  t = _loaded(str(workdir), "hierarchy")
  changed = copy.copy(t.stages["velocity"])
  changed.variables = jax.tree.map(lambda x: x, t.stages["velocity"].variables)
  kernel = changed.variables["params"]["encoder"]["mel_norm"]["scale"]
  changed.variables["params"]["encoder"]["mel_norm"]["scale"] = np.asarray(kernel) + 1
  assert transcribe._same_encoder(t.stages["onset_pitch"], t.stages["velocity"])
  assert not transcribe._same_encoder(t.stages["onset_pitch"], changed)


def test_transcribe_accepts_arrays_and_batches_one_segment_at_a_time(trained):
  workdir, wav, reference = trained
  audio, _ = soundfile.read(wav, dtype="float32")
  by_one = transcribe.load(str(workdir), "hierarchy", batch_segments=1).transcribe(audio)
  together = _loaded(str(workdir), "hierarchy").transcribe(audio)
  for field in ("onset", "offset", "pitch", "velocity"):
    np.testing.assert_array_equal(getattr(by_one, field), getattr(together, field))
  assert len(transcribe.load(str(workdir), "flatten").transcribe(np.zeros(0, np.float32))) == 0
  with pytest.raises(ValueError, match="mono"):
    _loaded(str(workdir), "flatten").transcribe(np.zeros((2, 100), np.float32))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "hiermt.transcribe", *map(str, args)], cwd=_ROOT,
                        capture_output=True, text=True, timeout=600, check=False)


def test_cli_writes_midi_per_file_and_reports_bad_files(trained, tmp_path):
  workdir, wav, reference = trained
  inputs = tmp_path / "in"
  inputs.mkdir()
  audio, _ = soundfile.read(wav, dtype="float32")
  # Stereo at 44.1 kHz: resampled and averaged to mono on reading.
  import librosa
  stereo = librosa.resample(audio, orig_sr=SAMPLE_RATE, target_sr=44100)
  soundfile.write(inputs / "stereo.flac", np.stack([stereo, stereo], axis=1), 44100)
  (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
  (inputs / "notes.txt").write_text("not audio")  # ignored: not an audio extension
  out = tmp_path / "out"
  result = _cli(f"--workdir={workdir}", f"--output_dir={out}", wav, inputs)
  assert result.returncode == 1, result.stderr
  assert "broken.wav" in result.stderr and "1 of 3 inputs failed" in result.stderr
  # Library INFO chatter (JAX's backend probing, Orbax's checkpoint bookkeeping) is not shown.
  assert "xla_bridge.py" not in result.stderr and "checkpoint_manager.py" not in result.stderr, result.stderr
  assert sorted(os.listdir(out)) == ["piece.mid", "stereo.mid"]
  written = notes_lib.read_midi(out / "piece.mid")
  assert metrics.note_metrics(reference, written)["onset_offset_velocity_f1"] >= 0.9
  assert metrics.note_metrics(reference, notes_lib.read_midi(out / "stereo.mid"))["onset_f1"] >= 0.9


def test_cli_names_a_missing_stage_and_how_to_train_it(trained, tmp_path):
  workdir, wav, _ = trained
  partial = tmp_path / "partial"
  shutil.copytree(workdir / "onset_pitch", partial / "onset_pitch")
  result = _cli(f"--workdir={partial}", f"--output_dir={tmp_path / 'out'}", wav)
  assert result.returncode == 2
  assert "stage 'velocity' is not trained" in result.stderr
  assert "python -m hiermt.main --config=configs/base.py:velocity" in result.stderr
  assert not (tmp_path / "out").exists()
  assert transcribe.available_layouts(workdir) == ["flatten", "hierarchy"] or \
      transcribe.available_layouts(workdir) == ["hierarchy", "flatten"]
  assert transcribe.available_layouts(partial) == []


def test_cli_refuses_a_checkpoint_that_does_not_fit_its_config(trained, tmp_path):
  workdir, wav, _ = trained
  changed = tmp_path / "changed"
  shutil.copytree(workdir, changed)
  config_path = changed / "onset_pitch" / "config.json"
  config = json.loads(config_path.read_text())
  config["decoder"]["num_layers"] += 1  # as if saved by a version whose decoder had one block less
  config_path.write_text(json.dumps(config))
  result = _cli(f"--workdir={changed}", f"--output_dir={tmp_path / 'out'}", wav)
  assert result.returncode == 2, result.stderr
  assert f"the checkpoint in {changed / 'onset_pitch'} does not fit" in result.stderr
  assert f"params/decoder/block_{config['decoder']['num_layers'] - 1}/" in result.stderr
  assert "checkpoint (absent)" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def encoder_workdir(tmp_path_factory):
  """A workdir whose encoder stage holds random runlocal CRNN weights (no training needed for layout checks)."""
  workdir = tmp_path_factory.mktemp("roll")
  config = load_base_config().get_config("encoder,runlocal")
  config.data.cache_dir = str(workdir / "cache")
  config.roll.onset = 0.45  # the stage's config decides the post-processing thresholds
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  model = transcriber.build_model(config)
  state, _ = train.create_state(model, config, train.make_optimizer(config), mesh, jax.random.key(0))
  checkpoint.write_stage(checkpoint.stage_dir(workdir, "encoder"), config, state)
  return workdir, model, {"params": state.params, "batch_stats": state.batch_stats}


def test_roll_layout_assembles_overlapping_windows_as_kong(encoder_workdir, monkeypatch):
  workdir, model, variables = encoder_workdir
  t = transcribe.load(str(workdir), "roll", batch_segments=2)
  audio = np.random.default_rng(0).uniform(-0.3, 0.3, 16000 * 23).astype(np.float32)  # 3 segments, 5 windows
  rolls = t.piece_rolls(audio)
  assert {k: v.shape for k, v in rolls.items()} == {k: (3000, 88) for k in ("onset", "offset", "frame", "velocity")}
  padded = np.pad(audio, (0, 30 * 16000 - len(audio)))
  frame = jax.jit(lambda v, a: model.apply(v, a, train=False)["frame"][0])  # one compile for three windows
  window = lambda w: np.asarray(frame(variables, padded[None, w * 80000:w * 80000 + 160000]))  # noqa: E731
  np.testing.assert_allclose(rolls["frame"][:750], window(0)[:750], atol=1e-5)  # first window: [0, 7.5) s
  np.testing.assert_allclose(rolls["frame"][750:1250], window(1)[250:750], atol=1e-5)  # middle halves
  np.testing.assert_allclose(rolls["frame"][2250:], window(4)[250:1000], atol=1e-5)  # last: [22.5, 30) s

  seen = {}
  original = transcribe.roll_notes.rolls_to_notes

  def spy(rolls, encoder, fps, thresholds):
    seen.update(encoder=encoder, fps=fps, thresholds=thresholds)
    return original(rolls, encoder, fps, thresholds)

  monkeypatch.setattr(transcribe.roll_notes, "rolls_to_notes", spy)
  notes = t.transcribe(audio)
  assert seen == {"encoder": "crnn", "fps": 100, "thresholds": {"onset": 0.45, "offset": 0.3, "frame": 0.1}}
  assert len(notes) and notes.onset.max() < 23.0 and notes.offset.max() <= 23.0 + 0.01  # >= 10 ms per note


def test_encoder_runs_on_power_of_two_pieces_of_the_real_rows(encoder_workdir, monkeypatch):
  # 6 segments in a decoding batch of 8: the encoder runs on 4 + 2 rows (not 8 with 2 of silence),
  # each row as it would alone, and the 2 filler rows repeat row 0 so decoding ends with the real rows.
  workdir, model, variables = encoder_workdir
  stage = transcribe.load(str(workdir), "roll", batch_segments=8).stages["encoder"]
  sizes, encode = [], stage._encode
  monkeypatch.setattr(stage, "_encode", lambda v, a: sizes.append(len(a)) or encode(v, a))
  audio = np.random.default_rng(1).uniform(-0.3, 0.3, (6, 16000)).astype(np.float32)
  out = stage.encode(audio, batch=8)
  assert sizes == [4, 2]
  alone = jax.jit(lambda v, a: model.apply(v, a, train=False))
  for name in ("frame", "features"):
    assert out[name].shape[0] == 8
    for row in range(6):
      np.testing.assert_allclose(out[name][row], alone(variables, audio[row:row + 1])[name][0], atol=1e-5)
    np.testing.assert_array_equal(out[name][6:], np.repeat(np.asarray(out[name][:1]), 2, axis=0))
  sizes.clear()
  assert stage.encode(audio[:3])["frame"].shape[0] == 3 and sizes == [2, 1]


def test_segments_carry_only_the_pitches_sounding_at_their_start():
  # Frame roll [2 segments, 5 frames, 88 keys]: C4 (column 39) is on in row 0's first two frames on
  # average, E4 in row 1's; A0 only in a later frame.
  frame = np.zeros((2, 5, 88), np.float32)
  frame[0, :2, 39] = [0.4, 0.7]  # mean 0.55
  frame[1, :2, 43] = 0.9
  frame[1, :2, 39] = [0.9, 0.0]  # mean 0.45: off
  frame[:, 3, 0] = 1.0
  sounding = transcribe._sounding_at_start(frame)
  assert sounding.shape == (2, vocab.NUM_PITCHES)
  assert [np.flatnonzero(row).tolist() for row in sounding] == [[60], [64]]


class _FlattenTokens:
  """A flatten stage that writes given tokens for every segment (no model)."""

  def __init__(self, tokens):
    self.tokens = np.asarray(tokens, np.int32)

  def encode(self, chunk, batch):
    return {"frame": np.zeros((batch, 500, 88), np.float32), "features": None}

  def free(self, features, rows, carriable=None):
    tokens = np.tile(self.tokens, (rows, 1))
    return tokens, np.ones(tokens.shape, np.float32)


def test_flatten_ends_a_note_where_its_key_is_struck_again():
  # Key 60 at 1.0 s written to end at 5.0 s, struck again at 3.0 s (ends 7.0 s): one sounding note per key.
  T, P, V = vocab.time_id, vocab.pitch_id, vocab.velocity_id
  tokens = [vocab.SOS, vocab.TASK_IDS["flatten"], T(100), P(60), T(500), V(80), T(300), P(60), T(700), V(90),
            vocab.EOS]
  notes = transcribe.NoteTranscriber("flatten", {"flatten": _FlattenTokens(tokens)}, 1).transcribe(
      np.zeros(10 * 16000, np.float32))
  rows = list(zip(notes.onset.tolist(), notes.offset.tolist(), notes.pitch.tolist(), notes.velocity.tolist()))
  assert rows == [(1.0, 3.0, 60, 80), (3.0, 7.0, 60, 90)]
