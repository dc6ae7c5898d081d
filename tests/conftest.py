"""Test setup: 8 forced CPU devices, so sharding code runs as on a multi-GPU host."""
import importlib.util
import os
import pathlib

import pytest

# Before anything imports jax.

# Tests compile many small programs and run each a few steps: XLA's backend
# optimisations cost more compile time than they save here.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_base_config():
  """configs/base.py as a module (it is a config file, not part of the package)."""
  spec = importlib.util.spec_from_file_location("hiermt_base_config", _ROOT / "configs" / "base.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
  """One cache folder per test session: the runlocal corpus is generated into it once."""
  return tmp_path_factory.mktemp("hiermt_cache")


def override(config, **overrides):
  """Sets dotted config fields, e.g. override(c, **{"train.steps": 2}); returns config."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture
def runlocal_config(corpus_cache):
  """Factory: get_config('STAGE,runlocal[,...]') on the session's generated corpus."""
  base = load_base_config()

  def make(arg, **overrides):
    config = base.get_config(arg + ",runlocal" if "runlocal" not in arg else arg)
    config.data.cache_dir = str(corpus_cache)
    return override(config, **overrides)

  return make


def assert_same_training_state(got, want, lr, steps, stats_tol=(1e-4, 1e-6)):
  """Two runs' {"params", "batch_stats"} after `steps` optimizer steps agree up to float noise.

  An Adam-family step moves a parameter by up to about lr whatever its gradient's size, and
  float noise in a small gradient (a bias before a BatchNorm has none at all) can move it
  either way. So: at most 0.1 % of all parameters may differ by more than lr / 10 (a tenth
  of one step), none by more than 2 lr a step. Batch statistics agree to `stats_tol`
  (rtol, atol).
  """
  import jax  # pylint: disable=import-outside-toplevel  (after the XLA flags above)
  import numpy as np  # pylint: disable=import-outside-toplevel
  rtol, atol = stats_tol
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got["batch_stats"],
               want["batch_stats"])
  pairs = list(zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"])))
  assert pairs and jax.tree.structure(got["params"]) == jax.tree.structure(want["params"])
  diffs = np.concatenate([np.abs(g - w).ravel() for g, w in pairs])
  off = int(np.sum(diffs > 0.1 * lr))
  assert off <= 1e-3 * diffs.size and diffs.max() <= 2 * lr * steps, (off, diffs.size, diffs.max(), lr)


# The longest files, longest first (measured on the 2-core machine). The suite runs on two xdist
# workers, one file at a time each (--dist loadfile), each taking the next file when it is done with
# its current one: a long file handed out last would keep one worker busy while the other idles.
_LONGEST_FILES = ("test_train.py", "test_train_step.py", "test_transcribe.py", "test_quickstart.py",
                  "test_decode.py", "test_validation.py", "test_benchmark.py", "test_device_counts.py",
                  "test_feature_pool.py", "test_encoders.py", "test_import_encoder.py", "test_objectives.py")


def pytest_configure(config):
  """Makes xdist hand out the files in the order of pytest_collection_modifyitems: by default
  (pytest-xdist >= 3.6) it hands out the files with the most tests first, which put one-test files
  of minutes at the end."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Schedules the longest test files first (stable: everything else keeps its order)."""
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
