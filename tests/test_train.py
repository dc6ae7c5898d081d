"""train.py end to end on runlocal configs: every stage, 1 vs 8 devices, 2 processes,
SIGKILL resume, SIGTERM save, non-finite loss, clear init errors."""
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

from hiermt import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Losses of the same run on different device/process layouts differ only by float
# summation order (all-reduces split differently).
LOSS_RTOL = 2e-4


def _losses(workdir, stage, split="train"):
  path = pathlib.Path(workdir) / stage / "metrics.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def _cli(workdir, arg, cache, *flags, env=None, **popen):
  cmd = [sys.executable, "-m", "hiermt.main", f"--config=configs/base.py:{arg}", f"--workdir={workdir}",
         f"--config.data.cache_dir={cache}", "--config.train.batch_size=8", *flags]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus_cache):
  """encoder,runlocal at batch 8 for 4 steps on 8 devices: the run the others must match."""
  from conftest import load_base_config  # pylint: disable=import-outside-toplevel
  config = load_base_config().get_config("encoder,runlocal")
  config.data.cache_dir = str(corpus_cache)
  config.train.batch_size = 8
  workdir = tmp_path_factory.mktemp("reference")
  train.run(config, str(workdir))
  return config, workdir, _losses(workdir, "encoder")


def test_reference_run_logs_every_step_and_checkpoints(reference_run):
  _, workdir, losses = reference_run
  assert sorted(losses) == [1, 2, 3, 4]
  assert all(np.isfinite(v) for v in losses.values())
  stage = pathlib.Path(workdir) / "encoder"
  assert sorted(int(p.name) for p in (stage / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  assert json.loads((stage / "config.json").read_text())["stage"] == "encoder"
  assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
  evals = [json.loads(l) for l in (stage / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
  assert evals and "frame_f1" in evals[-1]


def test_one_device_matches_eight(reference_run, tmp_path):
  config, _, want = reference_run
  train.run(config, str(tmp_path), devices=jax.devices()[:1])
  got = _losses(tmp_path, "encoder")
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL)


def test_two_processes_match_one(reference_run, tmp_path, corpus_cache):
  _, _, want = reference_run
  proc = subprocess.run(
      ["bash", "launch/local.sh", "2", "--config=configs/base.py:encoder,runlocal", f"--workdir={tmp_path}",
       f"--config.data.cache_dir={corpus_cache}", "--config.train.batch_size=8"],
      cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable, PORT=str(20000 + os.getpid() % 10000)),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = _losses(tmp_path, "encoder")
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL)


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(reference_run, tmp_path, corpus_cache):
  _, _, want = reference_run
  proc = _cli(tmp_path, "encoder,runlocal", corpus_cache)
  ckpt = tmp_path / "encoder" / "checkpoints" / "2"
  deadline = time.time() + 300
  while not (ckpt.exists() and (tmp_path / "encoder" / "metrics.jsonl").exists()
             and 3 in _losses(tmp_path, "encoder")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert ckpt.exists(), proc.stdout.read()[-3000:]
  restarted = _cli(tmp_path, "encoder,runlocal", corpus_cache)
  out, _ = restarted.communicate(timeout=600)
  assert restarted.returncode == 0, out[-3000:]
  assert "from step 2" in out
  rows = [json.loads(l) for l in (tmp_path / "encoder" / "metrics.jsonl").read_text().splitlines()]
  # The restarted process logs steps 3-4 again after resuming from step 2; its values are the later rows.
  after = {r["step"]: r["loss"] for r in rows if r["split"] == "train" and r["step"] > 2}
  np.testing.assert_allclose([after[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=LOSS_RTOL)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path, corpus_cache):
  proc = _cli(tmp_path, "encoder,runlocal", corpus_cache, "--config.train.steps=100000",
              "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000")
  metrics = tmp_path / "encoder" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = [p for p in (tmp_path / "encoder" / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved, out[-3000:]


def test_lm_stages_start_from_the_encoder_checkpoint_or_say_what_to_do(reference_run, runlocal_config, tmp_path):
  config = runlocal_config("velocity", **{"train.steps": 2})
  with pytest.raises(FileNotFoundError, match="Pretrain the encoder first"):
    train.run(config, str(tmp_path), devices=jax.devices()[:2])
  _, enc_workdir, _ = reference_run
  config.init_from = str(pathlib.Path(enc_workdir) / "encoder")
  state = train.run(config, str(tmp_path), devices=jax.devices()[:2])
  assert int(state.step) == 2
  assert (tmp_path / "velocity" / "metrics.jsonl").exists()


@pytest.mark.parametrize("stage", ["onset_pitch", "offset", "flatten"])
def test_other_lm_stages_train(runlocal_config, tmp_path, stage):
  config = runlocal_config(f"{stage},encoder=hppnet", **{"init_from": "none", "train.steps": 2})
  state = train.run(config, str(tmp_path), devices=jax.devices()[:2])
  losses = _losses(tmp_path, stage)
  assert int(state.step) == 2 and all(np.isfinite(v) for v in losses.values())


def test_non_finite_loss_stops_with_a_clear_message(runlocal_config, tmp_path):
  config = runlocal_config("encoder", **{"train.lr": 1e30, "train.grad_clip": 0.0})
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.run(config, str(tmp_path), devices=jax.devices()[:2])


def test_cli_rejects_unknown_override(tmp_path, corpus_cache):
  proc = _cli(tmp_path, "encoder,runlocal", corpus_cache, "--config.train.stepz=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "stepz" in out
