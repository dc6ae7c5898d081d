"""Reading PyTorch `.pth` checkpoints as numpy arrays, without PyTorch.

PyTorch (>= 1.6) saves a zip archive: `<name>/data.pkl`, a pickle whose tensors
refer by key to raw little-endian storages `<name>/data/<key>`. `read` unpickles
it with a restricted unpickler that knows only the few globals a state dict
needs (tensor and parameter rebuilding, typed storages, OrderedDict), so
reading a checkpoint never runs code from the file. Files in PyTorch's older
non-zip format are read with `torch.load(weights_only=True)` when PyTorch is
installed.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class CheckpointError(ValueError):
  """The file is not a readable PyTorch checkpoint."""


class _StorageType:
  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Rebuilds tensors as numpy arrays; refuses any other global."""

  _GLOBALS = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("collections", "OrderedDict"): collections.OrderedDict,
  }

  def __init__(self, file, archive, prefix):
    super().__init__(file)
    self._archive, self._prefix = archive, prefix

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in self._GLOBALS:
      return self._GLOBALS[(module, name)]
    raise CheckpointError(f"the checkpoint holds an object of type {module}.{name}, which a state dict "
                          "does not need; refusing to load it")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage":
      raise CheckpointError(f"unknown persistent object {kind!r}")
    data = self._archive.read(f"{self._prefix}/data/{key}")
    return np.frombuffer(data, storage_type.dtype, count=numel)


def read(path):
  """The object saved in a `.pth` file, tensors as numpy arrays.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: not a PyTorch checkpoint, or one holding more than arrays and containers.
  """
  with open(path, "rb"):
    pass  # FileNotFoundError with the path, before format checks
  if not zipfile.is_zipfile(path):
    return _read_legacy(path)
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise CheckpointError(f"{path}: a zip file, but not a PyTorch checkpoint (no single data.pkl)")
    prefix = pickles[0][:-len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).decode().strip() != "little":
      raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    with archive.open(pickles[0]) as f:
      return _Unpickler(f, archive, prefix).load()


def _read_legacy(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        f"{path} is not in PyTorch's zip format (saved by PyTorch < 1.6, or not a checkpoint); "
        "reading it needs PyTorch (pip install torch), or re-save it with a newer PyTorch") from e
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for foreign files
    raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e

  def to_numpy(x):
    if isinstance(x, torch.Tensor):
      return x.detach().cpu().numpy()
    if isinstance(x, dict):
      return type(x)((k, to_numpy(v)) for k, v in x.items())
    return x

  return to_numpy(loaded)
