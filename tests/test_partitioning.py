"""partitioning.py: mesh shapes, batch and fsdp shardings on 8 forced CPU devices; how processes
join a multi-process run (SLURM one task per GPU or per node, simulated)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt import partitioning

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_eight_devices_are_forced():
  assert jax.device_count() == 8


@pytest.mark.parametrize("fsdp", [1, 2, 8])
def test_mesh_and_batch_split_over_all_devices(fsdp):
  mesh = partitioning.make_mesh(fsdp)
  assert dict(mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
  batch = partitioning.global_batch(mesh, {"x": np.arange(16 * 3).reshape(16, 3)})
  assert batch["x"].shape == (16, 3)
  shards = batch["x"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (2, 3) for s in shards)
  np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(48).reshape(16, 3))


def test_fsdp_shards_large_params_and_replicates_small_ones():
  mesh = partitioning.make_mesh(4)
  tree = {"big": jax.ShapeDtypeStruct((1024, 512), jnp.float32), "small": jax.ShapeDtypeStruct((64,), jnp.float32),
          "odd": jax.ShapeDtypeStruct((1023, 257), jnp.float32)}
  sh = partitioning.state_shardings(mesh, tree)
  assert sh["big"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert sh["small"].spec == jax.sharding.PartitionSpec()
  assert sh["odd"].spec == jax.sharding.PartitionSpec()  # no dimension divisible by 4
  assert partitioning.state_shardings(partitioning.make_mesh(1), tree)["big"].spec == jax.sharding.PartitionSpec()


def test_bad_sizes_fail_clearly():
  with pytest.raises(ValueError, match="must divide the device count"):
    partitioning.make_mesh(3)


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]"}


def _slurm(ntasks, procid, localid, tasks_per_node, nodeid=0, **extra):
  return {**SLURM_JOB, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
          "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_NODEID": str(nodeid), **extra}


def test_slurm_one_task_per_gpu_takes_its_local_gpu():
  # 2 nodes x 8 tasks; every task sees the node's 8 GPUs: task 11 (local 3 on node 1) takes GPU 3.
  args = partitioning.distributed_args(_slurm(16, 11, 3, "8(x2)", nodeid=1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"))
  assert args == {"coordinator_address": f"gpu007:{4242 % 4096 + 61440}", "num_processes": 16, "process_id": 11,
                  "local_device_ids": [3], "layout": "per_gpu"}
  # Same without CUDA_VISIBLE_DEVICES: all GPUs visible, so the same choice.
  assert partitioning.distributed_args(_slurm(16, 11, 3, "8(x2)", nodeid=1))["local_device_ids"] == [3]
  # --gpus-per-task=1: SLURM already bound the task to one GPU, the only one it sees.
  bound = partitioning.distributed_args(_slurm(16, 11, 3, "8(x2)", nodeid=1, CUDA_VISIBLE_DEVICES="3"))
  assert bound["local_device_ids"] is None and bound["layout"] == "per_gpu"


def test_slurm_one_task_per_node_uses_every_gpu():
  args = partitioning.distributed_args(_slurm(4, 2, 0, "1(x4)", nodeid=2, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"))
  assert args["layout"] == "per_node" and args["local_device_ids"] is None
  assert (args["num_processes"], args["process_id"]) == (4, 2)


def test_slurm_overrides_and_errors():
  env = _slurm(16, 1, 1, "8(x2)", HIERMT_TASK_LAYOUT="per_node", HIERMT_COORDINATOR_PORT="1234")
  args = partitioning.distributed_args(env)
  assert args["layout"] == "per_node" and args["local_device_ids"] is None
  assert args["coordinator_address"] == "gpu007:1234"
  assert partitioning.distributed_args({**env, "HIERMT_LOCAL_DEVICE_IDS": "4,5"})["local_device_ids"] == [4, 5]
  with pytest.raises(ValueError, match="valid: per_gpu, per_node"):
    partitioning.distributed_args({**env, "HIERMT_TASK_LAYOUT": "per_socket"})
  with pytest.raises(ValueError, match="sees only 2 GPU"):
    partitioning.distributed_args(_slurm(16, 5, 5, "8(x2)", CUDA_VISIBLE_DEVICES="0,1"))
  assert partitioning.distributed_args(_slurm(1, 0, 0, "1")) is None  # one task: no distributed runtime
  assert partitioning.distributed_args({}) is None


@pytest.mark.parametrize("nodelist,host", [("node001", "node001"), ("node001,host2", "node001"),
                                           ("node[001-015],host2", "node001"), ("gpu[3,7-9]", "gpu3")])
def test_coordinator_is_the_first_node(nodelist, host):
  env = {**_slurm(2, 0, 0, "1(x2)"), "SLURM_STEP_NODELIST": nodelist}
  assert partitioning.distributed_args(env)["coordinator_address"].split(":")[0] == host


_REPORT = ("import json, jax; from hiermt import partitioning; args = partitioning.initialize_distributed(); "
           "print('REPORT', json.dumps(dict(args=args, process=jax.process_index(), processes=jax.process_count(), "
           "local=[d.id for d in jax.local_devices()], devices=jax.device_count(), "
           "cuda_visible=jax.config.values['jax_cuda_visible_devices'])))")


def test_two_processes_start_under_simulated_slurm():
  """Two local processes with the variables srun sets, in either task layout: each joins the job
  with the process id SLURM gave it and the devices the layout assigns (on CPU JAX records the GPU
  choice in jax_cuda_visible_devices and sees its forced CPU devices)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  layouts = {"per_node": [_slurm(2, i, 0, "1(x2)", nodeid=i, CUDA_VISIBLE_DEVICES="0,1") for i in range(2)],
             "per_gpu": [_slurm(2, i, i, "2", CUDA_VISIBLE_DEVICES="0,1") for i in range(2)]}
  for n, (layout, envs) in enumerate(layouts.items()):
    procs = []
    for env in envs:
      env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "HIERMT_", "OMPI_"))} | env
      env.update(SLURM_STEP_NODELIST="localhost", HIERMT_COORDINATOR_PORT=str(port + n), JAX_PLATFORMS="cpu",
                 XLA_FLAGS="--xla_force_host_platform_device_count=2")
      procs.append(subprocess.Popen([sys.executable, "-c", _REPORT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    reports = [json.loads(o.split("REPORT ", 1)[1].splitlines()[0]) for o in outs]
    for i, r in enumerate(reports):
      assert (r["process"], r["processes"], r["devices"], len(r["local"])) == (i, 2, 4, 2)
      # All GPUs visible to both tasks: one task per GPU takes GPU i; one per node drives them all.
      assert r["cuda_visible"] == (str(i) if layout == "per_gpu" else "all"), (layout, r)
      assert r["args"]["layout"] == layout and r["args"]["coordinator_address"] == f"localhost:{port + n}"
      assert r["args"]["local_device_ids"] == ([i] if layout == "per_gpu" else None)
    assert reports[0]["local"] != reports[1]["local"]
