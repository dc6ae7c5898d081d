"""Tests for hiermt.benchmark.official (the side-by-side timing against the official PyTorch code).

The official side needs a checkout of the official repository and a Python with
torch, which CI does not have: it is run by `python -m hiermt.benchmark
--what=vs_official` (README), and these tests cover the hiermt side.
"""
import os

import pytest

from hiermt.benchmark import official
from hiermt.models import decoder as decoder_lib


def official_param_count(layers, dim, vocab, feature_dim=official.FEATURE_DIM):
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
  report = official.measure_hiermt("nano", vocab=vocab, batch=1, tokens=16, steps=1)
  decoder = official.hiermt_config("nano", 16).decoder
  assert decoder.conditioning == "cross"
  assert report["params"] == official_param_count(decoder.num_layers, decoder.dim, vocab)
  assert report["remat"] is False
  assert report["last_loss"] < report["first_loss"]  # the timed step really updated the parameters
  assert report["seconds_per_step"] > 0 and len(report["step_seconds"]) == 1
  # Forward + backward matmuls: at least 3 x 2 x (non-embedding parameters) per token.
  dense = report["params"] - 2 * vocab * decoder.dim
  assert report["step_gflop"] * 1e9 >= 3 * 2 * dense * 16 * 0.9
  assert report["matmul_gflops_per_s"] > 0


def test_compare_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="models/enc_dec.py"):
    official.compare(tmp_path, size="nano", steps=1)
  with pytest.raises(ValueError, match="threads"):
    official.compare(tmp_path, threads=len(os.sched_getaffinity(0)) + 1)
  with pytest.raises(ValueError, match="steps"):
    official.compare(tmp_path, steps=0)
