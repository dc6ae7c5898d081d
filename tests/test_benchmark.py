"""Tests for `python -m hiermt.benchmark --what=decode|transcribe|accumulation` at runlocal sizes.

Nothing here is timed: the checks are that both modes run end to end and that
their reports are consistent, above all that the strategies `decode` compares
do the same work (the cached loop and the official strategy write identical
tokens on the segment both decode).
"""

import json

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from conftest import override
from hiermt import audio as audio_lib
from hiermt import train
from hiermt.benchmark import cli
from hiermt.benchmark import decode
from hiermt.benchmark import loader
from hiermt.benchmark import train as train_benchmark
from hiermt.benchmark import transcription

STAGES = ("onset_pitch", "velocity", "offset", "flatten")


def _run(capsys, **overrides):
  """`python -m hiermt.benchmark` in-process with `overrides` as flags; the printed JSON."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**overrides):
    cli.main([])
  return json.loads(capsys.readouterr().out)


def test_decode_strategies_do_the_same_work(capsys):
  report = _run(capsys, what="decode", sizes=["nano"], conditioning=["cross"], model_options="runlocal",
                piece_seconds=20.0, notes_per_second=0.2, uncached_notes_per_segment=1)
  setup = report["setup"]
  assert (setup["segments"], setup["notes_per_segment"], setup["official_notes_per_segment"]) == (2, 2, 0)
  entry = report["decoders"]["nano,cross"]
  assert set(entry) == {"params", "max_tokens", "notes_per_segment_1", "notes_per_segment_2"}
  assert "jax_uncached" not in entry["notes_per_segment_2"]  # the slow strategy ran at 1 note only
  block = entry["notes_per_segment_1"]
  cached, uncached = block["hiermt"], block["jax_uncached"]
  assert cached["onset_pitch"]["tokens_per_segment"] == 2 and cached["flatten"]["tokens_per_segment"] == 4
  assert cached["velocity"]["notes_per_segment"] == cached["offset"]["notes_per_segment"] == 1
  for stage in STAGES:
    assert uncached[stage]["tokens_equal_hiermt_segment0"], stage
    assert cached[stage]["batch"] == 2 and uncached[stage]["multiplied_by"] == 2
    assert uncached[stage]["piece_seconds"] == pytest.approx(2 * uncached[stage]["measured_seconds"], abs=2e-3)
    assert block["speedup_vs_jax_uncached"][stage] == pytest.approx(
        uncached[stage]["piece_seconds"] / cached[stage]["piece_seconds"], rel=0.02)
  assert uncached["onset_pitch"]["forward_passes_per_segment"] == 2
  assert uncached["velocity"]["forward_passes_per_segment"] == 1  # one forward pass per note
  totals = cached["totals"]
  assert totals["hierarchy"] == pytest.approx(sum(cached[s]["piece_seconds"] for s in STAGES[:3]), abs=1e-3)
  assert totals["hierarchy_over_flatten"] == pytest.approx(totals["hierarchy"] / totals["flatten"], rel=0.01)


def test_decode_rejects_more_notes_than_the_token_budget():
  with pytest.raises(ValueError, match="max_tokens"):
    decode.decode_report(["nano"], ["prefix"], options="runlocal", notes_per_second=10.0)  # 200 notes > 256 tokens


def test_transcribe_runs_every_layout(capsys):
  report = _run(capsys, what="transcribe", layouts=["hierarchy", "flatten", "roll"], conditioning=["prefix"],
                size="nano", model_options="runlocal", audio_seconds=15.0, notes_per_second=0.5, batch_segments=2,
                encoders=["crnn"])
  assert report["setup"]["segments"] == 2
  assert set(report["layouts"]) == {"hierarchy,prefix", "flatten,prefix", "roll"}
  for layout in report["layouts"].values():
    assert layout["encoder_width"] == 0.0625  # runlocal
    assert layout["real_time_factor"] == pytest.approx(15.0 / layout["steady_seconds"], rel=0.01)
    assert layout["batch_segments"] == 2 and layout["notes_written"] >= 0
  hierarchy = report["layouts"]["hierarchy,prefix"]
  assert hierarchy["fixed_tokens"] == 2 + 2 * 5 and report["layouts"]["flatten,prefix"]["fixed_tokens"] == 2 + 4 * 5
  assert report["layouts"]["roll"]["fixed_tokens"] is None
  assert sum(chain["segments"] for chain in hierarchy["offset_chain"]) == 2
  encoder = report["encoder_only"]["crnn"]
  assert encoder["real_time_factor"] == pytest.approx(2 * 10.0 / encoder["seconds"], rel=0.02)


def test_dense_audio_has_the_asked_length_and_level():
  audio = transcription.dense_audio(3.0, 20.0)
  assert audio.dtype == np.float32 and audio.shape == (3 * audio_lib.SAMPLE_RATE,)
  assert np.abs(audio).max() == pytest.approx(0.9, rel=1e-3)


def test_accumulation_times_k_micro_batches_against_one(capsys, corpus_cache, monkeypatch):
  with pytest.raises(ValueError, match="must hold 1"):
    train_benchmark.accumulation_report(["velocity"], "runlocal", [2, 4], 1, 1)
  # Two devices and a frozen encoder keep the compiles short; the report's math is the same.
  stage_config = loader.stage_config
  monkeypatch.setattr(loader, "stage_config", lambda *args: override(
      stage_config(*args), **{"data.cache_dir": str(corpus_cache), "freeze_encoder": True}))
  compiled = []
  compile_steps = train.compile_steps
  monkeypatch.setattr(train, "compile_steps",
                      lambda config: compiled.append(compile_steps(config, jax.devices()[:2])) or compiled[-1])
  report = _run(capsys, what="accumulation", stages=["velocity"], accums=["2", "1"], steps=1, rounds=2)
  stage = report["stages"]["velocity"]
  # runlocal's batch of 2 on 2 devices is one micro-batch; the k = 2 step holds two.
  assert [(c.config.train.batch_size, c.config.train.grad_accum) for c in compiled] == [(2, 1), (4, 2)]
  assert stage["micro_batch"] == 2
  step_s = {int(k): s for k, s in stage["step_s"].items()}
  assert step_s[1] > 0 and step_s[2] > 0
  np.testing.assert_allclose(stage["overhead"]["2"], step_s[2] / (2 * step_s[1]) - 1, atol=1e-3)
