"""atomic_output publishes whole files only."""

import os

import pytest

from hiermt import atomic_file


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
  target = os.path.join(tmp_path, "sub", "file.bin")
  with pytest.raises(KeyboardInterrupt):
    with atomic_file.atomic_output(target) as tmp:
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise KeyboardInterrupt
  assert os.listdir(os.path.join(tmp_path, "sub")) == []
  with atomic_file.atomic_output(target) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"whole")
  assert open(target, "rb").read() == b"whole"
  assert os.listdir(os.path.join(tmp_path, "sub")) == ["file.bin"]
