"""train.py end to end on runlocal configs: logs, checkpoints and validation of a run; preemption
of 2 processes, a crash (SIGKILL) and elastic resume on 1 then 2 processes (with Grain workers);
encoder hand-over between stages; checks on resume; non-finite loss. (32 devices:
tests/test_device_counts.py.)
(Equal updates on 1 and 8 devices: tests/test_train_step.py; every stage trained through the
CLI: the quickstart smoke run in tests/test_quickstart.py.)"""
import copy
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import load_base_config
from conftest import override
from hiermt import checkpoint
from hiermt import partitioning
from hiermt import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Losses of one run on different device/process layouts differ only by float
# summation order (all-reduces split differently).
LOSS_RTOL = 2e-4
# The multi-process, kill and preemption tests train the onset stage on top of a
# frozen encoder: the same code path as any stage, at a fraction of the CPU time.
# 2 s crops (the encoder's cost grows with the crop; nothing checked here depends on
# its length); 32 tokens truncate some of their sequences, so that their count is checked too.
# One evaluation, at the end: the resumed two-process run validates there.
CROP_SECONDS = 2.0
LM_STEPS = 8
LM_OVERRIDES = {"freeze_encoder": True, "train.steps": LM_STEPS, "train.eval_every": LM_STEPS,
                "data.segment_seconds": CROP_SECONDS, "data.max_tokens": 32}
LM_FLAGS = tuple(f"--config.{k}={v}" for k, v in LM_OVERRIDES.items())


def _rows(workdir, stage, split="train"):
  path = pathlib.Path(workdir) / stage / "metrics.jsonl"
  if not path.exists():
    return []
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _losses(workdir, stage, split="train"):
  return {r["step"]: r["loss"] for r in _rows(workdir, stage, split)}  # later rows win


def _host(state):
  return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


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


# Evaluations every step, logs every other one: evals must not wait for a log or checkpoint step.
# (Validation transcribes 10 s of a piece whatever the training crop.)
ENCODER_OVERRIDES = {"train.steps": 3, "train.log_every": 2, "train.eval_every": 1, "train.checkpoint_every": 2,
                     "data.segment_seconds": CROP_SECONDS}


class _Process(subprocess.Popen):
  """A `python -m hiermt.main` process whose output goes to a file (no pipe to fill up)."""

  def __init__(self, args, env, log):
    self.log = log
    with open(log, "w") as f:
      super().__init__(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)

  def output(self):
    return pathlib.Path(self.log).read_text()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, cache, processes, *flags, devices_per_process=4):
  """`processes` hiermt.main processes, as launch/local.sh starts them (one plain process for 1)."""
  args = [sys.executable, "-m", "hiermt.main", *_cli_args(workdir, "onset_pitch,runlocal", cache, *flags)]
  port, procs = _free_port(), []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if processes > 1:
      env.update(HIERMT_COORDINATOR=f"127.0.0.1:{port}", HIERMT_NUM_PROCESSES=str(processes),
                 HIERMT_PROCESS_ID=str(i), XLA_FLAGS=env.get("XLA_FLAGS", "") +
                 f" --xla_force_host_platform_device_count={devices_per_process}")
    log = pathlib.Path(workdir) / f"process{i}-{time.monotonic_ns()}.log"
    procs.append(_Process(args, env, log))
  return procs


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, corpus_cache):
  """The CRNN encoder stage (BatchNorm statistics over the global batch) on 8 devices."""
  config = _config("encoder,runlocal", corpus_cache, **ENCODER_OVERRIDES)
  workdir = tmp_path_factory.mktemp("encoder_run")
  state = train.run(config, str(workdir))
  return config, workdir, _losses(workdir, "encoder"), _host(state)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus_cache, encoder_run):
  """onset_pitch on the frozen pretrained encoder, 8 devices, in this process."""
  enc_workdir = encoder_run[1]
  config = _config("onset_pitch,runlocal", corpus_cache, **LM_OVERRIDES, init_from=str(enc_workdir / "encoder"))
  workdir = tmp_path_factory.mktemp("lm_run")
  train.run(config, str(workdir))
  return workdir, _losses(workdir, "onset_pitch")


def test_encoder_run_logs_checkpoints_and_evaluates(encoder_run):
  _, workdir, losses, _ = encoder_run
  assert sorted(losses) == [2, 3] and all(np.isfinite(v) for v in losses.values())
  stage = pathlib.Path(workdir) / "encoder"
  # Every validated step is saved with its score (checkpoint_every is 2): the last 3 are kept.
  assert sorted(int(p.name) for p in (stage / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]
  assert json.loads((stage / "config.json").read_text())["stage"] == "encoder"
  assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
  evals = _rows(workdir, "encoder", "eval")
  assert [r["step"] for r in evals] == [1, 2, 3]  # every eval_every, whatever log_every says
  # Teacher-forced frame F1 and the Roll decoding's note F1 of a transcribed validation piece.
  for key in ("frame_f1", "onset_f1", "onset_offset_f1", "onset_offset_velocity_f1"):
    assert 0.0 <= evals[-1][key] <= 1.0
  best = checkpoint.choose(str(stage), "best")
  assert best.kind == "best" and best.score == max(r["onset_offset_velocity_f1"] for r in evals)


def test_lm_stage_starts_from_the_encoder_checkpoint(encoder_run, lm_run, corpus_cache, tmp_path):
  enc_workdir = encoder_run[1]
  lm_workdir, losses = lm_run
  assert sorted(losses) == list(range(1, LM_STEPS + 1))
  enc = checkpoint.load_encoder(str(enc_workdir / "encoder"))
  lm = checkpoint.load_encoder(str(lm_workdir / "onset_pitch"))
  # Frozen: the LM stage's encoder is exactly the pretrained one, after its steps.
  jax.tree.map(np.testing.assert_array_equal, lm["params"], enc["params"])
  config = _config("velocity,runlocal", corpus_cache)
  with pytest.raises(FileNotFoundError, match="Pretrain the encoder first"):
    train.run(config, str(tmp_path))


def test_encoder_hand_over_reads_into_the_requested_shardings(encoder_run):
  directory = str(encoder_run[1] / "encoder")
  enc = checkpoint.load_encoder(directory)
  mesh = partitioning.make_mesh(8)

  def split(x):  # the first dimension over all 8 devices where it divides, else replicated
    spec = P("fsdp") if x.ndim and x.shape[0] % 8 == 0 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  like = {c: jax.tree.map(split, enc[c]) for c in ("params", "batch_stats")}
  assert any(s.sharding.spec == P("fsdp") for s in jax.tree.leaves(like))
  sharded = checkpoint.load_encoder(directory, like=like)
  jax.tree.map(lambda x, want: (x.sharding == want.sharding) or pytest.fail(f"{x.sharding} != {want.sharding}"),
               sharded, like)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), enc)
  wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (s.shape[-1] + 1,), s.dtype,
                                                      sharding=NamedSharding(mesh, P())), like)
  with pytest.raises(checkpoint.MismatchError, match="params/"):
    checkpoint.load_encoder(directory, like=wrong)


def test_resume_names_changed_fields_and_refuses_a_changed_model(encoder_run):
  config, workdir, _, _ = encoder_run
  directory = checkpoint.stage_dir(workdir, "encoder")
  same_model = override(copy.deepcopy(config), **{"train.steps": 5, "train.lr": 1e-3})
  state = train.compile_steps(same_model, jax.devices()[:1]).state
  changed = checkpoint.check_resume(directory, 3, state, same_model)
  assert changed == [f"train.lr: {config.train.lr!r} -> 0.001", "train.steps: 3 -> 5"]
  wider = override(copy.deepcopy(config), **{"encoder.width": 0.125})
  state = train.compile_steps(wider, jax.devices()[:1]).state
  with pytest.raises(ValueError, match=r"(?s)params/encoder.*encoder\.width: 0\.0625 -> 0\.125"):
    checkpoint.check_resume(directory, 3, state, wider)


def test_moving_average_is_kept_per_step_and_loaded_for_transcription(encoder_run, corpus_cache, tmp_path):
  """train.ema_decay: each step's checkpoint holds ema = d ema' + (1 - d) params (d = min(decay,
  t / (t + 10)) at update t: 0, 1/11, 2/12, 3/13 here); loading the stage reads the average; the
  frozen encoder in it stays the pretrained one exactly."""
  enc_workdir = encoder_run[1]
  config = _config("onset_pitch,runlocal", corpus_cache,
                   **{**LM_OVERRIDES, "train.steps": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 5,
                      "train.ema_decay": 0.5, "train.eval_pieces": 0}, init_from=str(enc_workdir / "encoder"))
  train.run(config, str(tmp_path))
  stage = tmp_path / "onset_pitch"
  saved = {}
  for step in range(1, 5):
    with ocp.PyTreeCheckpointer() as checkpointer:
      state = checkpointer.restore(stage / "checkpoints" / str(step) / "state")
    saved[step] = (state["params"], state["ema_params"])
  jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7), saved[1][1], saved[1][0])  # d = 0
  for step, d in ((2, 1 / 11), (3, 2 / 12), (4, 3 / 13)):
    want = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, saved[step - 1][1], saved[step][0])
    jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-7), saved[step][1], want)
  assert not np.allclose(saved[4][1]["decoder"]["head"]["kernel"], saved[4][0]["decoder"]["head"]["kernel"])
  loaded, _ = checkpoint.load_variables(str(stage), "", "latest")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded["params"]), saved[4][1])
  pretrained = checkpoint.load_encoder(str(enc_workdir / "encoder"))["params"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded["params"]["encoder"]), pretrained)


@flax.struct.dataclass
class _StateBeforeMovingAverage:
  """The train state as checkpoints written before `ema_params` existed hold it."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: Any


def test_checkpoints_older_than_the_moving_average_still_resume(encoder_run, tmp_path):
  config = encoder_run[0]
  c = train.compile_steps(config, jax.devices()[:1])
  state = c.state.replace(step=jnp.asarray(5, jnp.int32))
  directory = str(tmp_path / "encoder")
  checkpoint.write_stage(directory, config, _StateBeforeMovingAverage(state.step, state.params, state.batch_stats,
                                                                      state.opt_state))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, c.shardings)
  restored, step = checkpoint.restore_latest(checkpoint.make_manager(directory, config), abstract)
  assert step == 5 and isinstance(restored, train.TrainState) and restored.ema_params == {}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.params))


def _children(pid):
  """Process ids of `pid`'s live children (Linux /proc)."""
  found = set()
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    try:
      found.update(int(c) for c in (task / "children").read_text().split())
    except FileNotFoundError:  # a thread that ended after the listing has no children to report
      continue
  return found


def _wait_for_step(workdir, step, procs, timeout=600):
  """Waits until metrics.jsonl logs a step > `step` (or a process exits)."""
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if any(s > step for s in _losses(workdir, "onset_pitch")):
      return
    time.sleep(0.05)
  raise AssertionError(f"no step after {step} logged:\n" + "\n".join(p.output()[-3000:] for p in procs))


def _saved_step(out):
  steps = set(re.findall(r"every process saved step (\d+)", out))
  assert len(steps) == 1, out[-3000:]
  return int(steps.pop())


def test_preemption_and_crash_resume_across_process_counts(encoder_run, lm_run, tmp_path, corpus_cache):
  """SIGTERM to one of two processes: both save the same step and exit 75. The run resumes on one
  process with a Grain worker (2 -> 1 processes), is killed (SIGKILL) after a later checkpoint, and
  finishes on two (1 -> 2): the whole loss curve and the truncation counts are the uninterrupted
  8-device run's."""
  enc_workdir = encoder_run[1]
  lm_workdir, want = lm_run
  flags = (*LM_FLAGS, f"--config.init_from={enc_workdir / 'encoder'}")

  pair = _launch(tmp_path, corpus_cache, 2, *flags)
  _wait_for_step(tmp_path, 0, pair)
  pair[1].send_signal(signal.SIGTERM)  # only the second process gets the signal
  codes = [p.wait(timeout=600) for p in pair]
  outs = [p.output() for p in pair]
  assert codes == [train.PREEMPTED_EXIT_CODE] * 2, "\n".join(o[-3000:] for o in outs)
  first = _saved_step(outs[0])
  assert _saved_step(outs[1]) == first and first < LM_STEPS - 2, first
  assert checkpoint.has_checkpoint(str(tmp_path / "onset_pitch"))
  assert ocp.CheckpointManager(tmp_path / "onset_pitch" / "checkpoints").latest_step() == first
  # Each process loads half of every batch; the logged truncations count both halves.
  got_rows = {r["step"]: r for r in _rows(tmp_path, "onset_pitch")}
  want_rows = {r["step"]: r for r in _rows(lm_workdir, "onset_pitch")}
  assert want_rows[LM_STEPS]["truncated_sequences"] > 0
  assert [got_rows[s]["truncated_sequences"] for s in range(1, first + 1)] == \
         [want_rows[s]["truncated_sequences"] for s in range(1, first + 1)]

  # A crash (SIGKILL: nothing saved) of a one-process run with a Grain worker (2 -> 1 processes).
  (single,) = _launch(tmp_path, corpus_cache, 1, *flags, "--config.data.worker_count=1")
  manager = ocp.CheckpointManager(tmp_path / "onset_pitch" / "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and single.poll() is None:
    manager.reload()
    if (manager.latest_step() or 0) > first:
      break
    time.sleep(0.1)
  workers = _children(single.pid)
  assert workers, "the run with worker_count=1 should have a Grain worker process"
  single.send_signal(signal.SIGKILL)
  single.wait()
  deadline = time.time() + 30  # the kernel kills the workers with their parent (PR_SET_PDEATHSIG)
  while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
    time.sleep(0.1)
  assert not any(os.path.exists(f"/proc/{w}") for w in workers), "Grain workers outlived the killed trainer"
  out = single.output()
  assert f"from step {first}" in out and "compiling the train step" in out, out[-3000:]
  assert "host allocator: tcmalloc" in out  # main re-ran itself under tcmalloc (same pid, so SIGKILL hit it)
  manager.reload()
  second = manager.latest_step()
  assert first < second < LM_STEPS, (first, second, out[-3000:])

  pair = _launch(tmp_path, corpus_cache, 2, *flags)
  codes = [p.wait(timeout=600) for p in pair]
  assert codes == [0, 0], "\n".join(p.output()[-3000:] for p in pair)
  assert f"from step {second}" in pair[0].output()
  _assert_same_losses(_losses(tmp_path, "onset_pitch"), want)


def test_non_finite_loss_stops_with_a_clear_message(runlocal_config, tmp_path):
  config = runlocal_config("onset_pitch", **{"init_from": "none", "freeze_encoder": True, "train.lr": 1e30,
                                              "train.grad_clip": 0.0, "data.segment_seconds": CROP_SECONDS})
  with pytest.raises(train.NonFiniteLossError, match="last good checkpoint"):
    train.run(config, str(tmp_path), devices=jax.devices()[:2])


def test_cli_rejects_unknown_override(tmp_path, corpus_cache):
  proc = _cli(tmp_path, "encoder,runlocal", corpus_cache, "--config.train.stepz=3")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "stepz" in out
