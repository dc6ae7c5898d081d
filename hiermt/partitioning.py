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


# How processes map to accelerators (README "Many GPUs, many hosts"):
#   per_gpu:  one process per GPU (srun --ntasks-per-node=GPUS). A process that sees all of its
#             node's GPUs takes GPU SLURM_LOCALID; one that SLURM bound to its own GPU
#             (--gpus-per-task=1: CUDA_VISIBLE_DEVICES holds one id) takes that GPU.
#   per_node: one process per node (srun --ntasks-per-node=1) drives every GPU it sees.
# SLURM runs default to per_node with one task on the node and per_gpu otherwise;
# HIERMT_TASK_LAYOUT=per_gpu|per_node forces one, HIERMT_LOCAL_DEVICE_IDS=0,1,... (or
# JAX_LOCAL_DEVICE_IDS) names the devices outright.
TASK_LAYOUTS = ("per_gpu", "per_node")
_VISIBLE_DEVICE_VARS = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def _first_host(nodelist):
  """First host of a SLURM node list: 'gpu[003-004,9],cpu1' -> 'gpu003' (as JAX's SLURM detection)."""
  i = next((k for k, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
  if i == len(nodelist) or nodelist[i] == ",":
    return nodelist[:i]
  inside = nodelist[i + 1:]
  j = next((k for k, ch in enumerate(inside) if ch in ",-]"), len(inside))
  return nodelist[:i] + inside[:j]


def _tasks_on_node(env):
  """Tasks of this job step on this node, from SLURM_STEP_TASKS_PER_NODE ('8(x4)', '2,1')."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not spec:
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    return int(per_node) if per_node else None
  counts = []
  for part in spec.split(","):
    count, _, repeat = part.partition("(x")
    counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
  node = int(env.get("SLURM_NODEID", "0"))
  return counts[node] if node < len(counts) else counts[-1]


def _visible_devices(env):
  for var in _VISIBLE_DEVICE_VARS:
    if env.get(var):
      return [d for d in env[var].split(",") if d.strip()]
  return None


def distributed_args(env=None):
  """What `jax.distributed.initialize` gets in this environment, or None for a single process.

  Returns a dict of its keyword arguments (`coordinator_address`, `num_processes`,
  `process_id`, `local_device_ids`: None = every device this process sees) plus
  `layout` (per_gpu | per_node | the launcher's name). Pure: reads `env` (default
  os.environ) only, so every launch mode is testable without a cluster.

  Raises:
    ValueError: a task layout that cannot work, with what to change.
  """
  env = os.environ if env is None else env
  if "HIERMT_COORDINATOR" in env:  # launch/local.sh and hand-made launches
    ids = env.get("HIERMT_LOCAL_DEVICE_IDS") or env.get("JAX_LOCAL_DEVICE_IDS")
    return dict(coordinator_address=env["HIERMT_COORDINATOR"], num_processes=int(env["HIERMT_NUM_PROCESSES"]),
                process_id=int(env["HIERMT_PROCESS_ID"]),
                local_device_ids=[int(i) for i in ids.split(",")] if ids else None, layout="explicit")
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
    return _slurm_args(env)
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return dict(layout="openmpi")  # JAX's own Open MPI detection fills in everything
  return None


def _slurm_args(env):
  ntasks, procid, localid = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
  nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
  if not nodelist:
    raise ValueError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: launch with srun")
  # JAX's own SLURM rule for the port (the job id picks one of 4096 ephemeral ports) unless overridden.
  port = env.get("HIERMT_COORDINATOR_PORT") or str(int(env.get("SLURM_JOB_ID", "0")) % 4096 + 61440)
  tasks_here = _tasks_on_node(env)
  layout = env.get("HIERMT_TASK_LAYOUT") or ("per_node" if tasks_here == 1 else "per_gpu")
  if layout not in TASK_LAYOUTS:
    raise ValueError(f"HIERMT_TASK_LAYOUT={layout!r}; valid: {', '.join(TASK_LAYOUTS)}")
  ids = env.get("HIERMT_LOCAL_DEVICE_IDS") or env.get("JAX_LOCAL_DEVICE_IDS")
  visible = _visible_devices(env)
  if ids:
    local = [int(i) for i in ids.split(",")]
  elif layout == "per_node":
    local = None  # every GPU of the node
  elif visible is not None and len(visible) == 1:
    local = None  # SLURM bound this task to one GPU: it is the only device the task sees
  else:
    if visible is not None and localid >= len(visible):
      raise ValueError(
          f"one task per GPU, but task {localid} of this node sees only {len(visible)} GPU(s) "
          f"({_VISIBLE_DEVICE_VARS[0]}-style list {','.join(visible)}): request --gpus-per-node=N with "
          f"--ntasks-per-node=N, or one task per node (--ntasks-per-node=1)")
    local = [localid]
  return dict(coordinator_address=f"{_first_host(nodelist)}:{port}", num_processes=ntasks, process_id=procid,
              local_device_ids=local, layout=layout)


def initialize_distributed():
  """Joins a multi-process JAX run when launched as one; a no-op for a single process.

  `launch/local.sh` sets HIERMT_COORDINATOR / HIERMT_NUM_PROCESSES / HIERMT_PROCESS_ID;
  under SLURM the arguments come from the SLURM variables (`distributed_args`), in
  either task layout; under Open MPI JAX detects the cluster itself.

  Returns:
    The `distributed_args` used (None for a single process).
  """
  args = distributed_args()
  if args is None or jax.distributed.is_initialized():
    return args
  kwargs = {k: v for k, v in args.items() if k != "layout"}
  if args["layout"] != "openmpi":
    kwargs["cluster_detection_method"] = "deactivate"  # everything is explicit
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d (%s layout, local_device_ids %s), %d local / %d global devices",
               jax.process_index(), jax.process_count(), args["layout"],
               "all" if args.get("local_device_ids") is None else args["local_device_ids"],
               jax.local_device_count(), jax.device_count())
  return args


_barriers = [0]


def barrier(name, timeout_s=24 * 3600):
  """Blocks until every process reaches `name` (a no-op for one process).

  Uses the coordination service's barrier, whose timeout can be long (process 0
  may be preparing a corpus while the others wait) and which involves no device.
  """
  if jax.process_count() == 1:
    return
  _barriers[0] += 1
  name = f"hiermt_{name}_{_barriers[0]}"  # every process calls barriers in the same order
  from jax._src import distributed  # pylint: disable=import-outside-toplevel  (as Orbax does)
  client = distributed.global_state.client
  if client is None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(name, int(timeout_s * 1000))


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
