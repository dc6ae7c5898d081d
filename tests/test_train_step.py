"""train_step's math on fixed batches: exact gradient accumulation, and the same updates
(losses, parameters, BatchNorm statistics) on every device layout and model variant."""
import functools
import re

import jax
import numpy as np
import pytest

from conftest import assert_same_training_state
from conftest import load_base_config
from conftest import override
from hiermt import partitioning
from hiermt import train
from hiermt.data import pipeline

LOSS_RTOL = 2e-4


def _config(arg, cache, **overrides):
  # 1 s crops and 64 tokens: the math under test does not depend on the lengths, the CPU time does.
  config = load_base_config().get_config(arg + ",runlocal")
  config.data.cache_dir = str(cache)
  return override(config, **{"init_from": "none", "train.batch_size": 8, "data.segment_seconds": 1.0,
                             "data.max_tokens": 64, **overrides})


def _batches(config, n):
  it = iter(pipeline.make_dataset(config, "train", seed=0))
  return [next(it) for _ in range(n)]


def _train(c, batches):
  """Losses and gradient norms of `len(batches)` train steps of `c` (train.Compiled), and the
  initial and final {"params", "batch_stats"} on the host."""
  state, losses, norms = c.state, [], []
  initial = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  for batch in batches:
    state, metrics = c.train_fn(state, partitioning.global_batch(c.mesh, batch), c.step_rng)
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  return losses, norms, initial, jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


@pytest.mark.parametrize("arg,overrides,uneven,devices", [
    # Frozen encoder: no dropout, no batch statistics, so the split can only change the math
    # through the loss normalisation, which is what this pins. Target tokens differ per row.
    ("onset_pitch", {"freeze_encoder": True}, lambda b: b["loss_mask"][:, 1:].sum(1), 4),
    # HPPNet (instance norm, no dropout): its velocity term is a mean over onset frames, which
    # differ per row. Two devices: XLA:CPU convolves a one-row batch differently (gradients then
    # differ by ~7e-4 even on one device, through the instance norms), so micro-batches keep 2 rows.
    ("encoder,encoder=hppnet", {}, lambda b: b["onset"].sum((1, 2)), 2),
], ids=["tokens", "hppnet_encoder"])
def test_gradient_accumulation_is_exact_and_keeps_micro_batches_on_all_devices(corpus_cache, arg, overrides, uneven,
                                                                               devices):
  # 2 s crops: in 1 s ones HPPNet's onset-frame counts tie between micro-batches.
  config = _config(arg, corpus_cache, **{"train.batch_size": 16, "data.segment_seconds": 2.0, **overrides})
  (batch,) = _batches(config, 1)
  batch.pop("truncated", None)
  per_row = np.asarray(uneven(batch))
  micro = [per_row[i::4].sum() for i in range(4)]
  assert len(set(micro)) == 4, micro  # uneven micro-batches, or the test proves nothing
  c = train.compile_steps(config, jax.devices()[:devices])  # accum 4 fits: 16 rows
  global_batch = partitioning.global_batch(c.mesh, batch)
  loss_fn = functools.partial(train._micro_loss, c.model, config)
  results = {}
  # 4 micro-batches of uneven counts (2 would exercise the same code), in the rolled loop (accelerators)
  # and unrolled (CPU, `train.unroll_accumulation`).
  for accum, unroll in ((1, None), (4, False), (4, True)):
    def step(params, batch_stats, batch, rng, accum=accum, unroll=unroll):
      return train.accumulate_gradients(loss_fn, params, batch_stats, batch, rng, accum,
                                        train.loss_counts(config, batch), c.mesh, unroll)
    compiled = jax.jit(step).lower(c.state.params, c.state.batch_stats, global_batch, c.step_rng).compile()
    if accum > 1:
      # Each micro-batch takes rows from every device: no gathering of the batch (params are replicated).
      assert not re.search(r"all-gather|all-to-all|collective-permute", compiled.as_text())
    loss, grads, metrics, _ = compiled(c.state.params, c.state.batch_stats, global_batch, c.step_rng)
    results[accum, unroll] = jax.device_get((loss, grads, metrics))
  loss1, grads1, metrics1 = results[1, None]
  if "tokens" in metrics1:
    assert metrics1["tokens"] == per_row.sum()
  for unroll in (False, True):
    loss, grads, metrics = results[4, unroll]
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    assert metrics.keys() == metrics1.keys()
    for key in metrics:  # counts summed over micro-batches (tokens, frame counts), terms and accuracy exact
      np.testing.assert_allclose(metrics[key], metrics1[key], rtol=1e-5, err_msg=key)
    flat, want = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (grads, grads1))
    error = np.linalg.norm(flat - want) / np.linalg.norm(want)
    # Float noise: ~5e-7 measured on the earlier CI hosts; 2.7e-4 for HPPNet's encoder (its LSTMs
    # run over every frame) on an AMD EPYC host, where the loss and every metric still agree to 1e-5.
    assert error < 1e-3, (unroll, error)


@pytest.mark.parametrize("arg,overrides,layouts", [
    # The paper's default (prefix decoder, the CRNN fine-tuned with it: BatchNorm in train mode,
    # statistics over the global batch, dropout) on one device, and on 8 with parameters and
    # optimizer state split over them.
    ("onset_pitch", {"freeze_encoder": False}, ("one_device", "fsdp8")),
    # HPPNet fine-tuned under the cross-attention decoder, on one device or two.
    ("onset_pitch,encoder=hppnet,conditioning=cross", {"freeze_encoder": False, "train.batch_size": 2},
     ("one_device", "two_devices")),
], ids=["crnn_unfrozen_1_vs_8_fsdp", "hppnet_unfrozen_cross"])
def test_device_layouts_give_the_same_updates(corpus_cache, arg, overrides, layouts):
  config = _config(arg, corpus_cache, **overrides)
  batches = _batches(config, 2)
  runs = {}
  for layout in layouts:
    devices = {"one_device": jax.devices()[:1], "two_devices": jax.devices()[:2]}.get(layout, jax.devices())
    layout_config = override(_config(arg, corpus_cache, **overrides), **{"train.fsdp": 8 if layout == "fsdp8" else 1})
    c = train.compile_steps(layout_config, devices)
    assert c.config.train.batch_size == config.train.batch_size
    if layout == "fsdp8":
      specs = [s.spec for s in jax.tree.leaves(c.shardings.params)]
      assert any("fsdp" in str(spec) for spec in specs)  # some parameters really are split
    runs[layout] = _train(c, batches)
  (losses_a, norms_a, initial, state_a), (losses_b, norms_b, _, state_b) = runs[layouts[0]], runs[layouts[1]]
  np.testing.assert_allclose(losses_b, losses_a, rtol=LOSS_RTOL)
  np.testing.assert_allclose(norms_b, norms_a, rtol=1e-3)
  assert losses_a[0] != losses_a[1]
  # BatchNorm statistics: one device sums the batch in another order than an all-reduce over 8.
  assert_same_training_state(state_b, state_a, config.train.lr, len(batches), stats_tol=(1e-3, 1e-5))
  if not config.freeze_encoder:
    # Fine-tuned: the encoder's weights and batch statistics moved.
    for collection in ("params", "batch_stats"):
      if initial[collection]:
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state_a[collection]["encoder"],
                             initial[collection]["encoder"])
        assert any(jax.tree.leaves(moved)), collection


@pytest.mark.parametrize("devices", [1, 8, 16, 32])
def test_every_default_batch_fits_any_device_count(devices):
  base = load_base_config()
  for stage in base.STAGES:
    for size in base.DECODER_SIZES:
      for extra in ("", ",runlocal"):
        config = base.get_config(f"{stage},size={size}{extra}")
        batch = train.resolve_batch_size(config, devices)
        # The next multiple of the device count: never smaller, at most devices - 1 more.
        assert batch % devices == 0 and config.train.batch_size <= batch < config.train.batch_size + devices


def test_a_batch_that_cannot_split_names_the_values_that_work():
  config = load_base_config().get_config("velocity")  # batch 40 (Table II, base)
  config.train.round_batch = False
  assert train.resolve_batch_size(config, 8) == 40
  with pytest.raises(ValueError, match=r"multiple of 32 \(nearest: 32 or 64\)"):
    train.resolve_batch_size(config, 32)
  config.train.grad_accum = 3
  with pytest.raises(ValueError, match=r"multiple of 24 \(nearest: 24 or 48\), or keep it with "
                                       r"train.grad_accum in \[1, 5\]"):
    train.resolve_batch_size(config, 8)
