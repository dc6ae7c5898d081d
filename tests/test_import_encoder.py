"""Importing Kong's CRNN: the .pth reader, the tensor mapping against PyTorch's outputs, the CLI.

The reference outputs in tests/fixtures were made by Kong's own PyTorch model
and post-processor (tests/fixtures/kong_reference.py), so these tests need no PyTorch.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import load_base_config
from hiermt import import_encoder
from hiermt import roll_notes
from hiermt import torch_checkpoint
from hiermt import transcribe
from hiermt.models import crnn

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import kong_reference  # noqa: E402  pylint: disable=wrong-import-position

KONG_ROLLS = {"onset": "reg_onset_output", "offset": "reg_offset_output", "frame": "frame_output",
              "velocity": "velocity_output"}


@pytest.fixture(scope="module")
def reference():
  data = np.load(FIXTURES / "kong_reference.npz")
  shapes = {k: tuple(v) for k, v in json.loads(str(data["shapes"])).items()}
  return shapes, {k: data[v] for k, v in KONG_ROLLS.items()}, data["notes"]


@pytest.fixture(scope="module")
def kong_state(reference):
  """Kong's note-model state dict as the released file holds it (front-end buffers included)."""
  shapes = reference[0]
  state = kong_reference.random_state_dict(shapes)
  state.update({k: np.zeros(s, np.float32) for k, s in shapes.items() if k not in state})
  return state


def test_pth_reader_without_torch():
  loaded = torch_checkpoint.read(FIXTURES / "kong_small.pth")
  note = loaded["model"]["note_model"]
  np.testing.assert_array_equal(note["fc.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
  np.testing.assert_array_equal(note["fc.transposed"], np.arange(6, dtype=np.float32).reshape(2, 3).T)
  assert note["bn.num_batches_tracked"].dtype == np.int64 and int(note["bn.num_batches_tracked"]) == 7
  np.testing.assert_array_equal(note["half"], np.array([0.5, -2.0], np.float16))
  assert note["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(note["bf16"].astype(np.float32), [1.5, 3.0])
  assert loaded["model"]["pedal_model"]["fc.weight"].shape == (1, 2)


def test_pth_reader_refuses_foreign_objects(tmp_path):
  import pickle
  import zipfile
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": pathlib.Path("/")}))
  with pytest.raises(torch_checkpoint.CheckpointError, match="refusing"):
    torch_checkpoint.read(path)
  (tmp_path / "text.pth").write_text("not a checkpoint")
  with pytest.raises(torch_checkpoint.CheckpointError, match="zip format"):
    torch_checkpoint.read(tmp_path / "text.pth")
  with pytest.raises(FileNotFoundError):
    torch_checkpoint.read(tmp_path / "missing.pth")


def test_imported_crnn_rolls_equal_kongs_pytorch_model(reference, kong_state):
  _, kong_rolls, _ = reference
  variables, ignored = import_encoder.kong_crnn_variables(kong_state)
  assert "bn0.num_batches_tracked" in ignored and "logmel_extractor.melW" in ignored
  audio = jnp.asarray(kong_reference.reference_audio()[None])
  out = jax.jit(lambda v, a: crnn.CRNN(width=1.0).apply(v, a, train=False))(variables, audio)
  for name, expected in kong_rolls.items():
    # float32 on both sides; the log-mel front ends differ by float rounding only.
    np.testing.assert_allclose(np.asarray(out[name][0]), expected, atol=2e-4, err_msg=name)


def test_roll_decoding_equals_kongs_post_processor(reference):
  _, kong_rolls, kong_notes = reference
  notes = roll_notes.crnn_notes(kong_rolls, 100, *kong_reference.THRESHOLDS)
  ours = np.stack([notes.onset, notes.offset, notes.pitch, notes.velocity], axis=1)
  order = np.lexsort((kong_notes[:, 3], kong_notes[:, 1], kong_notes[:, 2], kong_notes[:, 0]))
  assert len(ours) == len(kong_notes) > 100
  np.testing.assert_allclose(ours, kong_notes[order], atol=1e-6)


def test_mismatched_state_dicts_name_the_tensors(kong_state):
  broken = dict(kong_state)
  del broken["frame_model.fc5.weight"]
  broken["extra_head.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing \['frame_model.fc5.weight'\]; unexpected \['extra_head.weight'\]"):
    import_encoder.kong_crnn_variables(broken)
  wrong = dict(kong_state, **{"frame_fc.bias": np.zeros(87, np.float32)})
  with pytest.raises(ValueError, match=r"frame_gru_fc.*bias.*imported shape \(87,\)"):
    import_encoder.kong_crnn_variables(wrong)
  with pytest.raises(ValueError, match="not a Kong CRNN checkpoint"):
    import_encoder.note_state_dict({"model": {"something": "else"}})


def test_imported_stage_transcribes_with_the_roll_layout(tmp_path, kong_state, reference):
  config = load_base_config().get_config("encoder,encoder=crnn")
  config.data.cache_dir = str(tmp_path / "cache")
  left_out = import_encoder.import_kong_crnn(
      {"model": {"note_model": kong_state, "pedal_model": {"x": np.zeros(1, np.float32)}}}, tmp_path / "run", config)
  assert left_out[0].startswith("pedal_model")
  t = transcribe.load(str(tmp_path / "run"), "roll")
  loaded = t.stages["encoder"].variables
  expected, _ = import_encoder.kong_crnn_variables(kong_state)
  for collection in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, loaded[collection]["encoder"], expected[collection])
  notes = t.transcribe(kong_reference.reference_audio())
  assert len(notes) > 0 and notes.offset.max() <= kong_reference.SECONDS + 0.01


def test_cli_refuses_to_overwrite_and_reports_bad_files(tmp_path):
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"\x00" * 10)
  run = lambda *a: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "hiermt.import_encoder", "--format=kong_crnn", *a], capture_output=True, text=True,
      cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300, check=False)
  result = run(f"--checkpoint={bad}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "import_encoder:" in result.stderr and "Traceback" not in result.stderr
  result = run(f"--checkpoint={FIXTURES / 'kong_small.pth'}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2 and "missing" in result.stderr
