"""Tests for hiermt.official_compare (the side-by-side timing against the official PyTorch code).

The official side needs a checkout of the official repository and a Python with
torch; the test that runs it is skipped unless HIERMT_OFFICIAL_REPO names a
checkout and torch is importable by HIERMT_TORCH_PYTHON (or this Python).
"""
import os
import subprocess
import sys

import pytest

from hiermt import official_compare
from hiermt.models import decoder as decoder_lib


def official_param_count(layers, dim, vocab, feature_dim=official_compare.FEATURE_DIM):
  """Parameters of the official EncDecPos, counted from its definition (models/enc_dec.py)."""
  hidden = decoder_lib.swiglu_hidden(dim)
  per_block = (4 * dim * dim  # self-attention: c_attn (3D) + c_proj
               + 4 * dim * dim  # cross-attention: c_attn (D) + c_attn2 (2D) + c_proj
               + 2 * 3 * dim * hidden  # two SwiGLU MLPs
               + 4 * dim)  # four RMSNorm scales
  audio = (feature_dim * dim + dim) + (64 * dim + dim)  # audio_emb_to_emb and pos_fc, with biases
  return 2 * vocab * dim + audio + layers * per_block + dim  # wte + lm_head, ..., ln_f


def test_hiermt_side_trains_the_official_architecture():
  vocab = 300
  report = official_compare.measure_hiermt("nano", vocab=vocab, batch=1, tokens=16, steps=1)
  decoder = official_compare.hiermt_config("nano", 16).decoder
  assert decoder.conditioning == "cross"
  assert report["params"] == official_param_count(decoder.num_layers, decoder.dim, vocab)
  assert report["remat"] is False
  assert report["last_loss"] < report["first_loss"]  # the timed step really updated the parameters
  assert report["seconds_per_step"] > 0 and len(report["step_seconds"]) == 1


def test_compare_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="models/enc_dec.py"):
    official_compare.compare(tmp_path, size="nano", steps=1)
  with pytest.raises(ValueError, match="threads"):
    official_compare.compare(tmp_path, threads=len(os.sched_getaffinity(0)) + 1)
  with pytest.raises(ValueError, match="steps"):
    official_compare.compare(tmp_path, steps=0)


def _torch_python():
  python = os.environ.get("HIERMT_TORCH_PYTHON", sys.executable)
  found = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False).returncode == 0
  return python if found else None


@pytest.mark.skipif(not os.environ.get("HIERMT_OFFICIAL_REPO") or _torch_python() is None,
                    reason="needs HIERMT_OFFICIAL_REPO (official checkout) and a Python with torch "
                           "(HIERMT_TORCH_PYTHON)")
def test_compare_runs_both_sides_at_equal_size():
  report = official_compare.compare(os.environ["HIERMT_OFFICIAL_REPO"], size="nano", batch=1, tokens=32, steps=1,
                                    torch_python=_torch_python(), threads=1)
  assert report["settings"]["vocab"] == 6504
  assert report["params_match"]
  assert report["official"]["params"] == official_param_count(2, 64, 6504)
  assert report["official"]["num_threads"] == 1
  for side in ("official", "hiermt"):
    assert report[side]["seconds_per_step"] > 0
    assert report[side]["last_loss"] < report[side]["first_loss"]
  assert report["speedup"] == pytest.approx(
      report["official"]["seconds_per_step"] / report["hiermt"]["seconds_per_step"], rel=1e-2)
