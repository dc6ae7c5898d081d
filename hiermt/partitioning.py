"""The one place that builds the device mesh and the shardings.

Data parallel over a `data` mesh axis; with `config.train.fsdp > 1` parameters and
optimiser state are also split over an `fsdp` axis (ZeRO-3 style), which the
large decoder sizes need on 80 GB cards. Batches are always split over both axes,
so every device sees a distinct slice of the global batch.
"""

import os

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize_distributed():
  """Joins a multi-process JAX run when launched as one; a no-op for a single process.

  `launch/local.sh` sets HIERMT_COORDINATOR / HIERMT_NUM_PROCESSES / HIERMT_PROCESS_ID;
  under SLURM (or Open MPI) JAX detects the cluster by itself.
  """
  if jax.distributed.is_initialized():
    return
  if "HIERMT_COORDINATOR" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["HIERMT_COORDINATOR"],
        num_processes=int(os.environ["HIERMT_NUM_PROCESSES"]),
        process_id=int(os.environ["HIERMT_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(fsdp=1, devices=None):
  """A [data, fsdp] mesh over all devices of all processes."""
  devices = jax.devices() if devices is None else devices
  if len(devices) % fsdp:
    raise ValueError(f"train.fsdp={fsdp} must divide the device count {len(devices)}")
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  return Mesh(grid, ("data", "fsdp"))


def batch_sharding(mesh):
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def _param_spec(shape, fsdp):
  """Shards the largest dimension divisible by the fsdp size; small arrays stay replicated."""
  if fsdp == 1 or int(np.prod(shape)) < 2**16:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh, abstract_state):
  """NamedShardings for a pytree of (abstract) arrays: replicated, or fsdp-split when the mesh has fsdp > 1."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _param_spec(np.shape(x), fsdp)), abstract_state)


def global_batch(mesh, local_batch):
  """Assembles each process's slice of the batch into global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
