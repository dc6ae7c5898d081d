"""data/pipeline.py: per-stage batches, determinism, process slicing, exact resume, one-time
preparation across processes."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from hiermt import vocabulary
from hiermt.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("stage", ["encoder", "onset_pitch", "velocity", "offset", "flatten"])
def test_batches_have_fixed_shapes_per_stage(runlocal_config, stage):
  config = runlocal_config(stage)
  batch = next(iter(pipeline.make_dataset(config, "train", seed=0)))
  b, n = config.train.batch_size, 160000
  assert batch["audio"].shape == (b, n) and batch["audio"].dtype == np.int16
  assert np.abs(batch["audio"].astype(np.float32)).max() > 0  # real audio, not padding only
  if stage == "encoder":
    for key in ("frame", "onset", "offset", "velocity", "onset_mask", "mask"):
      assert batch[key].shape == (b, 1001, 88), key
    # Onset targets peak at 1 only on a frame-aligned onset; the onset mask marks onset frames.
    assert batch["frame"].max() == 1.0 and batch["onset"].max() > 0.5 and batch["onset_mask"].max() == 1.0
  else:
    L = config.data.max_tokens
    assert batch["tokens"].shape == (b, L) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].shape == (b, L)
    assert (batch["tokens"][:, 0] == vocabulary.SOS).all()
    assert batch["loss_mask"][:, :2].sum() == 0  # <sos> and the task token are never targets


def test_hppnet_targets_are_at_50_fps(runlocal_config):
  batch = next(iter(pipeline.make_dataset(runlocal_config("encoder,encoder=hppnet"), "train", seed=0)))
  assert batch["frame"].shape[1] == 501


def test_same_seed_same_data_other_seed_other_data(runlocal_config):
  config = runlocal_config("onset_pitch")
  a = _take(iter(pipeline.make_dataset(config, "train", seed=3)), 2)
  b = _take(iter(pipeline.make_dataset(config, "train", seed=3)), 2)
  c = _take(iter(pipeline.make_dataset(config, "train", seed=4)), 1)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert not np.array_equal(a[0]["audio"], c[0]["audio"])


def test_processes_get_disjoint_slices_of_the_same_global_batch(runlocal_config):
  config = runlocal_config("velocity")
  whole = next(iter(pipeline.make_dataset(config, "train", seed=0, process_index=0, process_count=1)))
  parts = [next(iter(pipeline.make_dataset(config, "train", seed=0, process_index=p, process_count=2)))
           for p in range(2)]
  for key in whole:
    np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]), err_msg=key)


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_exactly(runlocal_config, workers):
  config = runlocal_config("offset", **{"data.worker_count": workers, "train.batch_size": 2})
  ds = pipeline.make_dataset(config, "train", seed=0)
  it = iter(ds)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = iter(pipeline.make_dataset(config, "train", seed=0))
  resumed.set_state(state)
  for got, want in zip(_take(resumed, 2), expected):
    _assert_same(got, want)


def test_eval_stream_is_finite(runlocal_config):
  config = runlocal_config("encoder")
  assert len(list(pipeline.make_dataset(config, "validation", seed=1, num_batches=2))) == 2


@pytest.mark.parametrize("process_count", [1, 2])
def test_stream_starts_at_any_batch_on_any_process_count(runlocal_config, process_count):
  # A run resumed at step k starts at batch k: the same data whatever saved the checkpoint.
  config = runlocal_config("velocity")
  expected = _take(iter(pipeline.make_dataset(config, "train", seed=0, process_index=0, process_count=1)), 3)[2]
  parts = [next(iter(pipeline.make_dataset(config, "train", seed=0, first_batch=2, process_index=p,
                                           process_count=process_count))) for p in range(process_count)]
  for key in expected:
    np.testing.assert_array_equal(expected[key], np.concatenate([p[key] for p in parts]), err_msg=key)


_EVERY_EFFECT = {"data.augment.enabled": True, "data.augment.eq_prob": 1.0, "data.augment.reverb_prob": 1.0,
                 "data.augment.noise_prob": 1.0}


@pytest.mark.parametrize("stage", ["encoder", "onset_pitch"])
def test_only_train_crops_are_augmented_and_labels_never_change(runlocal_config, stage):
  raw_config, config = runlocal_config(stage), runlocal_config(stage, **_EVERY_EFFECT)
  assert not raw_config.data.augment.enabled  # runlocal smoke runs see the corpus as rendered
  raw = next(iter(pipeline.make_dataset(raw_config, "train", seed=0)))
  augmented = next(iter(pipeline.make_dataset(config, "train", seed=0)))
  _assert_same(augmented, next(iter(pipeline.make_dataset(config, "train", seed=0))))  # deterministic
  assert not np.array_equal(raw["audio"][0], augmented["audio"][0])
  assert not np.array_equal(raw["audio"][1], augmented["audio"][1])
  _assert_same({k: v for k, v in raw.items() if k != "audio"}, {k: v for k, v in augmented.items() if k != "audio"})
  for split in ("validation", "test"):
    _assert_same(next(iter(pipeline.make_dataset(raw_config, split, seed=1, num_batches=1))),
                 next(iter(pipeline.make_dataset(config, split, seed=1, num_batches=1))))


def test_augmented_crop_is_aligned_with_the_raw_crop(runlocal_config):
  # Gain alone, -6.0206 dB: every sample exactly halved in place (the reverb context is cut off again).
  halve = {"data.augment.enabled": True, "data.augment.gain_prob": 1.0, "data.augment.gain_db": (-20 * np.log10(2),) * 2,
           "data.augment.eq_prob": 0.0, "data.augment.reverb_prob": 0.0, "data.augment.noise_prob": 0.0}
  raw = next(iter(pipeline.make_dataset(runlocal_config("encoder"), "train", seed=2)))["audio"]
  halved = next(iter(pipeline.make_dataset(runlocal_config("encoder", **halve), "train", seed=2)))["audio"]
  np.testing.assert_array_equal(halved, np.rint(raw / 2).astype(np.int16))


_PREPARE_SCRIPT = """
import json, sys
from hiermt import partitioning
partitioning.initialize_distributed()
import importlib.util, jax
from hiermt.data import pipeline, prepare
ran = []
original = prepare.prepare
prepare.prepare = lambda *a, **k: (ran.append(jax.process_index()), original(*a, **k))[1]
spec = importlib.util.spec_from_file_location("base", "configs/base.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)
config = base.get_config("onset_pitch,runlocal")
config.data.cache_dir, config.data.data_dir, config.data.prepared_dir = sys.argv[1:4]
store = pipeline.prepared_dir(config)
print("REPORT", json.dumps(dict(process=jax.process_index(), prepared=len(ran), store=store)))
"""


def test_process_0_prepares_a_shared_data_dir_while_the_others_wait(runlocal_config, tmp_path):
  """Two processes with separate caches (hence separate host locks, as on two hosts) and one shared
  data_dir: process 0 prepares the store, process 1 waits and then finds it ready."""
  data_dir = os.path.dirname(pipeline.prepared_dir(runlocal_config("onset_pitch")))  # the session's corpus
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HIERMT_"))}
    env.update(HIERMT_COORDINATOR=f"127.0.0.1:{port}", HIERMT_NUM_PROCESSES="2", HIERMT_PROCESS_ID=str(i),
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-c", _PREPARE_SCRIPT, str(tmp_path / f"cache{i}"), data_dir, str(tmp_path / "store")]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
  reports = [json.loads(o.split("REPORT ", 1)[1].splitlines()[0]) for o in outs]
  assert [r["prepared"] for r in reports] == [1, 0]
  assert reports[0]["store"] == reports[1]["store"] == str(tmp_path / "store")
