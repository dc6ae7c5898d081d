"""train.py end to end on runlocal configs: 1 vs 8 devices, 2 processes, SIGKILL resume,
SIGTERM save, encoder hand-over between stages, every LM stage, non-finite loss."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import load_base_config
from conftest import override
from hiermt import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Losses of one run on different device/process layouts differ only by float
# summation order (all-reduces split differently).
LOSS_RTOL = 2e-4
# The multi-process, kill and preemption tests train the onset stage on top of a
# frozen encoder: the same code path as any stage, at a fraction of the CPU time.
LM_FLAGS = ("--config.freeze_encoder=True", "--config.train.steps=4")


def _losses(workdir, stage, split="train"):
  path = pathlib.Path(workdir) / stage / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == split}  # later rows win


def _assert_same_losses(got, want):
  steps = sorted(want)
  assert sorted(got) == steps
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=LOSS_RTOL)


def _config(arg, cache, **overrides):
  """`arg` at batch 8 (one example per forced device) on the session's corpus."""
  config = load_base_config().get_config(arg)
  config.data.cache_dir = str(cache)
  config.train.batch_size = 8
  return override(config, **overrides)


def _cli_args(workdir, arg, cache, *flags):
  return [f"--config=configs/base.py:{arg}", f"--workdir={workdir}", f"--config.data.cache_dir={cache}",
          "--config.train.batch_size=8", *flags]


def _cli(workdir, arg, cache, *flags):
  return subprocess.Popen([sys.executable, "-m", "hiermt.main", *_cli_args(workdir, arg, cache, *flags)],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, corpus_cache):
  """The CRNN encoder stage (BatchNorm statistics over the global batch) on 8 devices."""
  config = _config("encoder,runlocal", corpus_cache, **{"train.steps": 2})
  workdir = tmp_path_factory.mktemp("encoder_run")
  train.run(config, str(workdir))
  return config, workdir, _losses(workdir, "encoder")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus_cache, encoder_run):
  """onset_pitch on the frozen pretrained encoder, 8 devices, in this process."""
  _, enc_workdir, _ = encoder_run
  config = _config("onset_pitch,runlocal", corpus_cache,
                   **{"freeze_encoder": True, "train.steps": 4, "init_from": str(enc_workdir / "encoder")})
  workdir = tmp_path_factory.mktemp("lm_run")
  train.run(config, str(workdir))
  return workdir, _losses(workdir, "onset_pitch")


def test_encoder_run_logs_checkpoints_and_evaluates(encoder_run):
  _, workdir, losses = encoder_run
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  stage = pathlib.Path(workdir) / "encoder"
  assert sorted(int(p.name) for p in (stage / "checkpoints").iterdir() if p.name.isdigit()) == [2]
  assert json.loads((stage / "config.json").read_text())["stage"] == "encoder"
  assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
  evals = [json.loads(l) for l in (stage / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
  assert evals and 0.0 <= evals[-1]["frame_f1"] <= 1.0


def test_one_device_matches_eight(encoder_run, tmp_path):
  config, _, want = encoder_run
  train.run(config, str(tmp_path), devices=jax.devices()[:1])
  _assert_same_losses(_losses(tmp_path, "encoder"), want)


def test_lm_stage_starts_from_the_encoder_checkpoint(encoder_run, lm_run, corpus_cache, tmp_path):
  _, enc_workdir, _ = encoder_run
  lm_workdir, losses = lm_run
  assert sorted(losses) == [1, 2, 3, 4]
  from hiermt import checkpoint  # pylint: disable=import-outside-toplevel
  enc = checkpoint.load_encoder(str(enc_workdir / "encoder"))
  lm = checkpoint.load_encoder(str(lm_workdir / "onset_pitch"))
  # Frozen: the LM stage's encoder is exactly the pretrained one, after 4 steps.
  jax.tree.map(np.testing.assert_array_equal, lm["params"], enc["params"])
  config = _config("velocity,runlocal", corpus_cache)
  with pytest.raises(FileNotFoundError, match="Pretrain the encoder first"):
    train.run(config, str(tmp_path))


def test_two_processes_match_one(encoder_run, lm_run, tmp_path, corpus_cache):
  _, enc_workdir, _ = encoder_run
  _, want = lm_run
  proc = subprocess.run(
      ["bash", "launch/local.sh", "2", *_cli_args(tmp_path, "onset_pitch,runlocal", corpus_cache, *LM_FLAGS,
                                                  f"--config.init_from={enc_workdir / 'encoder'}")],
      cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable, PORT=str(20000 + os.getpid() % 10000)),
      capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  _assert_same_losses(_losses(tmp_path, "onset_pitch"), want)


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(encoder_run, lm_run, tmp_path, corpus_cache):
  _, enc_workdir, _ = encoder_run
  _, want = lm_run
  flags = (*LM_FLAGS, f"--config.init_from={enc_workdir / 'encoder'}")
  proc = _cli(tmp_path, "onset_pitch,runlocal", corpus_cache, *flags)
  ckpt = tmp_path / "onset_pitch" / "checkpoints" / "2"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if ckpt.exists() and 3 in _losses(tmp_path, "onset_pitch"):
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ckpt.exists(), proc.stdout.read()[-3000:]
  restarted = _cli(tmp_path, "onset_pitch,runlocal", corpus_cache, *flags)
  out, _ = restarted.communicate(timeout=600)
  assert restarted.returncode == 0, out[-3000:]
  assert "from step 2" in out  # resumed from the checkpoint, not from a finished run
  assert "host allocator: tcmalloc" in out  # main re-ran itself under tcmalloc (same pid, so SIGKILL hit it)
  _assert_same_losses(_losses(tmp_path, "onset_pitch"), want)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, corpus_cache):
  proc = _cli(tmp_path, "onset_pitch,runlocal", corpus_cache, "--config.init_from=none",
              "--config.freeze_encoder=True", "--config.train.steps=100000",
              "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000")
  metrics = tmp_path / "onset_pitch" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = [int(p.name) for p in (tmp_path / "onset_pitch" / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < 100000, out[-3000:]


@pytest.mark.parametrize("stage", ["velocity", "offset", "flatten"])
def test_every_lm_stage_trains(lm_run, corpus_cache, tmp_path, stage):
  # Same model and mesh as lm_run: the compiled step is reused; only the data differ.
  config = _config(f"{stage},runlocal", corpus_cache, **{"freeze_encoder": True, "init_from": "none",
                                                          "train.steps": 2})
  state = train.run(config, str(tmp_path))
  losses = _losses(tmp_path, stage)
  assert int(state.step) == 2 and sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())


def test_non_finite_loss_stops_with_a_clear_message(runlocal_config, tmp_path):
  config = runlocal_config("onset_pitch", **{"init_from": "none", "freeze_encoder": True, "train.lr": 1e30,
                                              "train.grad_clip": 0.0})
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.run(config, str(tmp_path), devices=jax.devices()[:2])


def test_cli_rejects_unknown_override(tmp_path, corpus_cache):
  proc = _cli(tmp_path, "encoder,runlocal", corpus_cache, "--config.train.stepz=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "stepz" in out
