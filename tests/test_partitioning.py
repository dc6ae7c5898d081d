"""partitioning.py: mesh shapes, batch and fsdp shardings on 8 forced CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt import partitioning


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
