"""The README's first command on many devices: train.run on 32 forced CPU devices.
(A file of its own: one subprocess of a minute or two that the test runner can schedule
apart from tests/test_train.py.)"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Runs in a process with 32 forced CPU devices: the README's first command (encoder,runlocal, whose
# batch of 2 rounds up to the device count) on all of them, one step. (On 1 device it
# trains in test_validation.py's preempted run, on 8 in test_train.py's encoder_run; the rounding
# for every stage and size: test_train_step.py.) 1 s crops instead of 10 s keep 32 rows cheap on a
# CPU; the device-count logic does not depend on the crop length.
_DEVICE_COUNTS_SCRIPT = """
import importlib.util, json, sys
import jax
from hiermt import train
spec = importlib.util.spec_from_file_location("base", "configs/base.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)
cache, workdir = sys.argv[1:3]
config = base.get_config("encoder,runlocal")
config.data.cache_dir = cache
config.data.segment_seconds = 1.0
config.train.steps = 1
config.train.eval_batches = 0
config.train.eval_pieces = 0
state = train.run(config, workdir, devices=jax.devices())
rows = [json.loads(l) for l in open(f"{workdir}/encoder/metrics.jsonl")]
batch = json.load(open(f"{workdir}/encoder/config.json"))["train"]["batch_size"]
print("RESULT", json.dumps(dict(devices=len(jax.devices()), step=int(state.step), batch=batch, loss=rows[-1]["loss"])))
"""


def test_readme_command_runs_on_32_devices(tmp_path, corpus_cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=32 --xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-c", _DEVICE_COUNTS_SCRIPT, str(corpus_cache), str(tmp_path)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (result,) = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
  assert result["devices"] == result["batch"] == 32  # the batch of 2 rounded up to the device count
  assert result["step"] == 1 and np.isfinite(result["loss"])
