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
