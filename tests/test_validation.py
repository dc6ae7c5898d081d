"""Training-time validation (note F1 of transcribed validation pieces), best checkpoints, the trainer's
messages: per-stage F1 of known decoder outputs, the validator on a sharded state, best vs latest
checkpoints in `transcribe`, a finished stage's rerun, what to run next."""
import pathlib
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from conftest import load_base_config
from hiermt import checkpoint
from hiermt import next_steps
from hiermt import notes as notes_lib
from hiermt import partitioning
from hiermt import roll_notes
from hiermt import train
from hiermt import transcribe
from hiermt import validation
from hiermt import vocabulary as vocab
from hiermt.data import pipeline
from hiermt.data import prepare
from hiermt.models import transcriber

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _notes(rows):
  return notes_lib.Notes.create(*(np.array(column) for column in zip(*rows)))


# Four notes in one 10 s segment; velocities of two levels, so that mir_eval's velocity fit is easy to follow.
REFERENCE = _notes([(1.0, 2.0, 60, 40), (2.0, 3.0, 62, 40), (3.0, 4.0, 64, 100), (4.0, 5.0, 65, 100)])
AUDIO = np.zeros(vocab.SEGMENT_STEPS * 160, np.float32)  # one 10 s segment at 16 kHz


class _KnownStage:
  """Stands in for a trained `transcribe.StageModel`: its decoder "writes" fixed tokens or answers."""
  min_pitch_prob = 0.0

  def __init__(self, free_tokens=None, answer=None, sounding=(), free_probs=None):
    self._free_tokens = free_tokens  # int32 [tokens] of the one segment
    self._free_probs = free_probs  # float [tokens], each token's probability (default all 1)
    self._answer = answer  # (table, note ids of a segment) -> answer token ids
    self._sounding = list(sounding)  # frame-roll columns on from the segment's start

  def encode(self, segments, batch=None):
    rows = len(segments) if batch is None else batch
    frame = np.zeros((rows, 1000, 88), np.float32)  # by default no pitch sounding: guess nothing carried
    frame[:, :, self._sounding] = 1.0
    return {"features": np.zeros((rows, 1, 1), np.float32), "frame": frame}

  def free(self, features, rows, carriable=None):
    self.carriable = carriable
    tokens = self._free_tokens[None][:rows]
    probs = np.ones(tokens.shape, np.float32) if self._free_probs is None else self._free_probs[None][:rows]
    return tokens, probs

  def forced(self, features, queries, table):
    return [self._answer(table, ids) for _, ids, _ in queries]


def _scores(stage, known):
  layout = validation.layout_of(stage)
  transcriber = transcribe.NoteTranscriber(layout, {stage: known}, batch_segments=8)
  return validation.score(transcriber, stage, [(AUDIO, REFERENCE)])


def test_onset_pitch_scores_its_onsets_and_pitches():
  # 3 of 4 reference notes and one wrong pitch: P = R = 3/4.
  decoded = _notes([(1.0, 1.1, 60, 100), (2.0, 2.1, 62, 100), (3.0, 3.1, 64, 100), (4.0, 4.1, 67, 100)])
  known = _KnownStage(free_tokens=vocab.encode_segment(decoded, 0.0, "onset_pitch")[0])
  assert _scores("onset_pitch", known) == {"onset_f1": pytest.approx(0.75)}


def test_onset_pitch_leaves_out_notes_with_unsure_pitches():
  # As above, the wrong pitch written with probability 0.4: below min_pitch_prob 0.5 it is left out,
  # P = 3/3, R = 3/4, F1 = 6/7. Its time token's own probability does not count.
  decoded = _notes([(1.0, 1.1, 60, 100), (2.0, 2.1, 62, 100), (3.0, 3.1, 64, 100), (4.0, 4.1, 67, 100)])
  tokens = vocab.encode_segment(decoded, 0.0, "onset_pitch")[0]
  probs = np.full(len(tokens), 0.9, np.float32)
  probs[2 + 2 * 3] = 0.1  # the fourth note's time
  probs[2 + 2 * 3 + 1] = 0.4  # and its pitch
  known = _KnownStage(free_tokens=tokens, free_probs=probs)
  assert _scores("onset_pitch", known) == {"onset_f1": pytest.approx(0.75)}  # 0 keeps every note
  known.min_pitch_prob = 0.5
  assert _scores("onset_pitch", known) == {"onset_f1": pytest.approx(6 / 7)}
  known.min_pitch_prob = 0.95
  assert _scores("onset_pitch", known) == {"onset_f1": 0.0}


def test_velocity_scores_velocities_of_the_reference_notes():
  seen = []

  def answer(table, ids):
    seen.append((table.onset[ids].tolist(), table.pitch[ids].tolist()))
    return vocab.velocity_id(np.array([40, 40, 100, 40]))

  # Reference velocities 40, 40, 100, 100 scale to 0, 0, 1, 1; mir_eval fits the estimates 40, 40, 100,
  # 40 to them by least squares, y = (v - 10) / 90 = 1/3, 1/3, 1, 1/3: only the third note is within 0.1.
  assert _scores("velocity", _KnownStage(answer=answer)) == {"onset_offset_velocity_f1": pytest.approx(0.25)}
  assert seen == [([100, 200, 300, 400], [60, 62, 64, 65])]  # asked about the reference's onsets and pitches


def test_offset_scores_offsets_of_the_reference_onsets():
  def answer(table, ids):
    offsets = np.array([200, 300, 400, 700])  # the last note 2 s too long
    return vocab.time_id(offsets[:len(ids)])

  assert _scores("offset", _KnownStage(answer=answer)) == {"onset_offset_f1": pytest.approx(0.75)}


def test_flatten_scores_whole_notes():
  # Three right onsets, one of them ending 2 s late, and a wrong pitch: On 3/4, On-Off 2/4; the two
  # On-Off matches have their reference velocities, which any fit maps exactly: On-Off-Vel 2/4.
  decoded = _notes([(1.0, 2.0, 60, 40), (2.0, 3.0, 62, 40), (3.0, 6.0, 64, 100), (4.0, 5.0, 67, 100)])
  # C4's frame roll is on from the start, yet a piece's first segment carries nothing in.
  known = _KnownStage(free_tokens=vocab.encode_segment(decoded, 0.0, "flatten")[0], sounding=[39])
  assert _scores("flatten", known) == {"onset_f1": pytest.approx(0.75), "onset_offset_f1": pytest.approx(0.5),
                                       "onset_offset_velocity_f1": pytest.approx(0.5)}
  assert known.carriable.shape == (1, vocab.NUM_PITCHES) and not known.carriable.any()  # one segment: the first


def test_decoded_notes_the_reference_lacks_get_placeholders():
  decoded = _notes([(1.0, 1.1, 60, 100), (4.0, 4.1, 67, 100)])
  known = _KnownStage(free_tokens=vocab.encode_segment(decoded, 0.0, "onset_pitch")[0])
  transcriber = transcribe.NoteTranscriber("hierarchy", {"onset_pitch": known}, batch_segments=8)
  for reference, velocity, offset in ((REFERENCE, [40, vocab.PLACEHOLDER_VELOCITY], [2.0, 10.0]),
                                      (notes_lib.Notes.empty(), [vocab.PLACEHOLDER_VELOCITY] * 2, [10.0, 10.0])):
    notes = transcriber.transcribe(AUDIO, given=reference)
    assert notes.velocity.tolist() == velocity and notes.offset.tolist() == offset  # unknown: end with the audio


def test_hierarchy_without_its_stages_needs_reference_notes():
  transcriber = transcribe.NoteTranscriber("hierarchy", {"offset": _KnownStage()}, batch_segments=8)
  with pytest.raises(ValueError, match="lacks the onset_pitch, velocity stage"):
    transcriber.transcribe(AUDIO)


class _RollsOnly:
  """Stands in for a `transcribe.NoteTranscriber` of an HPPNet encoder stage whose rolls are `rolls`."""

  def __init__(self, rolls):
    self.stages = {"encoder": types.SimpleNamespace(
        config=load_base_config().get_config("encoder,encoder=hppnet"), frames_per_second=50,
        roll_thresholds=dict(roll_notes.DEFAULT_THRESHOLDS["hppnet"]))}
    self._rolls = rolls

  def piece_rolls(self, audio):
    return self._rolls


def test_encoder_validation_calibrates_the_roll_thresholds():
  """train.calibrate_roll: an encoder whose onsets all stay under the published 0.4 scores 0 with it; the
  onset threshold chosen on the pieces finds its notes and comes back with the scores (saved with the
  checkpoint), the frame threshold as published."""
  rolls = {name: np.zeros((100, 88), np.float32) for name in roll_notes.ROLL_NAMES}
  rolls["onset"][10, 39] = rolls["onset"][50, 43] = 0.125  # C4 at 0.2 s, E4 at 1.0 s (50 frames/s)
  rolls["onset"][80, 0] = 0.0625  # a spurious A0 at 1.6 s, written only from onset threshold 0.05
  rolls["frame"][11:30, 39] = 0.875  # C4 ends at frame 29
  reference = _notes([(0.2, 0.58, 60, 1), (1.0, 1.18, 64, 1)])
  pieces = [(np.zeros(32000, np.float32), reference)]
  assert len(roll_notes.rolls_to_notes(rolls, "hppnet", 50)) == 0  # the published thresholds: no note
  calibrated = validation.score(_RollsOnly(rolls), "encoder", pieces, calibrate=True)
  # Onset 0.1: the first grid value under 0.125 from 0.4 down; E4 lasts one frame (its frame roll is off).
  assert (calibrated["roll_onset_threshold"], calibrated["roll_frame_threshold"]) == (0.1, 0.4)
  assert (calibrated["onset_f1"], calibrated["onset_offset_f1"]) == (1.0, 0.5)


def test_validator_scores_the_sharded_state(runlocal_config, monkeypatch):
  """The validator on 8 devices with fsdp-sharded parameters: the decoder reads the state's own parameters
  and the score is that of the notes it "wrote" (every other note of the piece: precision 1)."""
  config = runlocal_config("onset_pitch", **{"train.fsdp": 8, "train.batch_size": 8, "init_from": "none",
                                             "freeze_encoder": True})
  compiled = train.compile_steps(config)
  state = compiled.state
  # A decoder parameter split over the 8 devices: the decoder must see all of it.
  path, sharded = next((path, x) for path, x in jax.tree_util.tree_flatten_with_path(state.params["decoder"])[0]
                       if not x.sharding.is_fully_replicated)
  store = prepare.Store(pipeline.prepared_dir(config), config.data.eval_split)
  (_, reference), = validation.load_pieces(store, 1, config.train.eval_seconds)
  kept = notes_lib.Notes.create(*(getattr(reference, f)[::2] for f in ("onset", "offset", "pitch", "velocity")))
  tokens = vocab.encode_segment(kept, 0.0, "onset_pitch")[0]

  def free(self, features, rows):
    seen = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        self.variables["params"]["decoder"])[0]}[jax.tree_util.keystr(path)]
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(jax.device_get(sharded)))
    return tokens[None], np.ones((1, len(tokens)), np.float32)

  monkeypatch.setattr(transcribe.StageModel, "free", free)
  scores = validation.Validator(compiled.config, compiled.mesh)(state)
  # Every written note is a reference note: precision 1, recall written / reference notes.
  recall = len(vocab.decode_segment(tokens, "onset_pitch")["onset"]) / len(reference)
  assert len(reference) >= 4 and 0 < recall < 1
  assert scores == {"onset_f1": pytest.approx(2 * recall / (1 + recall))}


def test_best_checkpoint_is_kept_besides_the_latest(tmp_path):
  config = load_base_config().get_config("encoder,runlocal")
  config.train.keep_checkpoints = 1
  manager = checkpoint.make_manager(str(tmp_path), config)
  for step, score in ((1, 0.2), (2, 0.9), (3, None), (4, 0.5)):
    checkpoint.save(manager, step, {"x": jnp.full(3, step)}, force=True, score=score)
  manager.wait_until_finished()
  assert manager.latest_step() == 4
  like = {"x": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  restored, step = checkpoint.restore_latest(manager, like)
  assert step == 4 and restored["x"].tolist() == [4, 4, 4]  # resume reads the latest
  manager.close()
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]  # the highest score (step 2), not only the latest
  best = checkpoint.choose(str(tmp_path), "best")
  assert (best.step, best.kind, best.score, best.latest) == (2, "best", 0.9, 4)
  assert checkpoint.choose(str(tmp_path), "latest").step == 4
  # A resumed run's manager knows the saved scores: the best survives its saves until beaten.
  for step, score in ((5, None), (6, 0.95)):
    manager = checkpoint.make_manager(str(tmp_path), config)
    checkpoint.save(manager, step, {"x": jnp.full(3, step)}, force=True, score=score)
    manager.wait_until_finished()
    manager.close()
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ([2, 5] if score is None else [6])


# Roll thresholds "calibrated" with the best checkpoint of `encoder_stage` (a CRNN).
CALIBRATED = {"onset": 0.15, "offset": 0.5, "frame": 0.25}


@pytest.fixture(scope="module")
def encoder_stage(tmp_path_factory):
  """WORKDIR/encoder with step 1 (validation score 0.9, Roll thresholds `CALIBRATED`) and step 2 (score 0.1,
  other parameters)."""
  workdir = tmp_path_factory.mktemp("best")
  config = load_base_config().get_config("encoder,runlocal")
  config.data.cache_dir = str(workdir / "cache")
  config.train.steps = 2
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  model = transcriber.build_model(config)
  state, _ = train.create_state(model, config, train.make_optimizer(config), mesh, jax.random.key(0))
  directory = checkpoint.stage_dir(workdir, "encoder")
  calibrated = {roll_notes.calibrated_key(name): value for name, value in CALIBRATED.items()}
  checkpoint.write_stage(directory, config, state.replace(step=jnp.asarray(1)), score=0.9, extra=calibrated)
  later = state.replace(step=jnp.asarray(2), params=jax.tree.map(lambda x: x + 1, state.params))
  checkpoint.write_stage(directory, config, later, score=0.1)
  return workdir, jax.device_get(state.params), jax.device_get(later.params)


def test_transcribe_reads_the_best_checkpoint_unless_asked_for_the_latest(encoder_stage, tmp_path):
  workdir, best_params, latest_params = encoder_stage
  best = transcribe.load(str(workdir), "roll").stages["encoder"]
  latest = transcribe.load(str(workdir), "roll", which="latest").stages["encoder"]
  assert (best.step, latest.step) == (1, 2)
  # Each checkpoint decodes its rolls with the thresholds calibrated for it; none saved: the config's.
  assert best.roll_thresholds == CALIBRATED
  assert latest.roll_thresholds == dict(load_base_config().get_config("encoder,runlocal").roll)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(best.variables["params"]), best_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(latest.variables["params"]), latest_params)

  wav = tmp_path / "quiet.wav"
  soundfile.write(wav, np.zeros(16000, np.float32), 16000)
  result = subprocess.run([sys.executable, "-m", "hiermt.transcribe", f"--workdir={workdir}", "--layout=roll",
                           "--checkpoint=latest", f"--output_dir={tmp_path / 'out'}", str(wav)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "latest checkpoint, step 2" in result.stderr


def test_best_falls_back_to_the_latest_when_nothing_was_scored(tmp_path):
  config = load_base_config().get_config("encoder,runlocal")
  manager = checkpoint.make_manager(str(tmp_path), config)
  checkpoint.save(manager, 3, {"x": jnp.zeros(2)}, force=True)
  manager.wait_until_finished()
  manager.close()
  choice = checkpoint.choose(str(tmp_path), "best")
  assert (choice.step, choice.kind) == (3, "latest")
  assert choice.describe().startswith("no best checkpoint") and "latest checkpoint, step 3" in choice.describe()


def test_rerunning_a_finished_stage_says_so_and_what_comes_next(encoder_stage):
  workdir = encoder_stage[0]
  start = time.time()
  result = subprocess.run([sys.executable, "-m", "hiermt.main", "--config=configs/base.py:encoder,runlocal",
                           f"--workdir={workdir}", "--config.train.steps=2", "--config.train.batch_size=8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  elapsed = time.time() - start
  assert result.returncode == 0, result.stderr[-3000:]
  assert "stage encoder is already complete at step 2" in result.stderr
  assert "compiling" not in result.stderr  # nothing was built
  checkpoints = workdir / "encoder" / "checkpoints"
  assert result.stdout.splitlines() == [
      f"encoder: checkpoints in {checkpoints} (latest step 2; best step 1, validation onset_offset_velocity_f1 "
      "0.9000)",
      "next:",
      f"  python -m hiermt.main --config=configs/base.py:onset_pitch,runlocal --workdir={workdir} "
      "--config.train.steps=2 --config.train.batch_size=8"]
  assert elapsed < 60, elapsed  # interpreter, JAX import and one directory listing


def test_after_the_last_stage_come_transcription_and_evaluation():
  assert next_steps.commands("configs/base.py:flatten,size=tiny", {"train.steps": 9}, "runs/a b", "/data/m") == [
      "python -m hiermt.transcribe '--workdir=runs/a b' '--output_dir=runs/a b/transcriptions' AUDIO...",
      "python -m hiermt.evaluate '--workdir=runs/a b' --data_dir=/data/m --split=test"]
  assert next_steps.commands("configs/base.py:velocity,encoder=hppnet", {}, "w", "") == [
      "python -m hiermt.main --config=configs/base.py:offset,encoder=hppnet --workdir=w"]


def test_a_misspelt_config_key_fails_in_one_line_naming_the_valid_keys(tmp_path):
  result = subprocess.run([sys.executable, "-m", "hiermt.main", "--config=configs/base.py:encoder,runlocal",
                           f"--workdir={tmp_path}", "--config.train.eval_piece=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2 and not result.stdout
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
  assert result.stderr.startswith("hiermt.main: error: unknown config key 'train.eval_piece' (did you mean "
                                  "train.eval_pieces?); valid keys of train: batch_size, ")
  assert ", steps, " in result.stderr


def test_a_preempted_run_scores_its_last_checkpoint_when_asked(runlocal_config, tmp_path, monkeypatch):
  """train.eval_on_preemption: the state a SIGTERM saves is validated, so it can be the best checkpoint
  (the quickstart ends every stage that way; without it the best would be an older, weaker state)."""
  config = runlocal_config("encoder", **{"train.eval_every": 100, "train.eval_batches": 0,
                                         "train.eval_on_preemption": True})
  monkeypatch.setattr(train._Preemption, "stop_after", lambda self, step: step >= 2)
  # The validator's calibrated Roll thresholds (train.calibrate_roll, the default) are saved with the score.
  monkeypatch.setattr(validation.Validator, "__call__",
                      lambda self, state: {validation.score_key("encoder"): 0.25 + int(state.step),
                                           **{key: 0.05 * int(state.step) for key in self.saved_keys}})
  with pytest.raises(train.Preempted):
    train.run(config, str(tmp_path), devices=jax.devices()[:1])
  best = checkpoint.choose(checkpoint.stage_dir(str(tmp_path), "encoder"), "best")
  assert (best.step, best.kind, best.score) == (2, "best", 2.25)
  assert roll_notes.stored_thresholds(best.metrics, config.encoder.name) == {
      name: pytest.approx(0.1) for name in roll_notes.DEFAULT_THRESHOLDS[config.encoder.name]}
