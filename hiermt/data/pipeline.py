"""Grain input pipeline: seeded 10 s crops of raw audio with per-stage targets.

Batch `k` of a run is made of the global example indices [k*B, (k+1)*B); each
process builds only its contiguous slice of that range. Example `i` is a pure
function of (seed, i) — which piece, where the crop starts — so the data order
is the same on 1 or N processes, with any worker count, and after a restore: a
run resumed at step k starts the stream at batch k (`first_batch`).

The loader ships int16 audio: features are computed on the accelerator. Crops of
the "train" split are augmented first (hiermt/data/augment.py) when
`config.data.augment.enabled`, from a random stream of (seed, index) of their own;
validation and test crops never are, and no augmentation changes a label.
"""

import ctypes
import dataclasses
import fcntl
import os
import signal
import sys

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from hiermt import objectives
from hiermt import partitioning
from hiermt import vocabulary
from hiermt.data import augment
from hiermt.data import prepare
from hiermt.data import synth
from hiermt.models import crnn
from hiermt.models import hppnet

# Frame rate of each encoder's rolls, which the encoder-stage targets must match.
ENCODER_FPS = {"crnn": crnn.CRNN.FRAMES_PER_SECOND, "hppnet": hppnet.HPPNet.FRAMES_PER_SECOND}
# Only crops of this split are augmented.
AUGMENTED_SPLIT = "train"
# Third entropy word of an example's augmentation stream, so it is independent of its crop stream.
_AUGMENT_STREAM = 1


def _prepare_here(config):
  """Generates (when no data_dir is set) and prepares the corpus unless done, under a per-host file lock."""
  cache = os.path.expanduser(config.data.cache_dir)
  os.makedirs(cache, exist_ok=True)
  data_dir = os.path.expanduser(config.data.data_dir) or os.path.join(
      cache, f"generated-{config.data.generated_minutes:g}min-seed{config.seed}")
  with open(os.path.join(cache, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    # A corpus of an older generator version is brought up to date (unchanged pieces are kept).
    if not config.data.data_dir and not synth.is_current(data_dir):
      logging.info("no data_dir configured: generating a %g-minute corpus into %s",
                   config.data.generated_minutes, data_dir)
      synth.build_corpus(data_dir, minutes=config.data.generated_minutes, seed=config.seed, cache_dir=cache)
    return prepare.ensure_prepared(data_dir, config.data.prepared_dir, workers=config.data.worker_count,
                                   sample_rate=config.data.sample_rate)


_PREPARED = {}  # multi-process runs: the store of each corpus, found once per process


def prepared_dir(config):
  """The prepared store of the configured corpus, building what is missing first.

  With `data.data_dir` empty, a corpus of `data.generated_minutes` is generated into
  `data.cache_dir` on first use. In a multi-process run process 0 generates and
  prepares while the others wait at a barrier (so a data_dir shared by all hosts is
  prepared once, not by every host at the same time); then every process checks
  the store and, if it does not see it (a node-local data_dir), prepares its own
  copy. A per-host file lock makes processes of one host (or independent runs
  sharing a cache) do the work once. Every process must call this the same number
  of times (make_dataset does, symmetrically).
  """
  if jax.process_count() == 1:
    return _prepare_here(config)
  d = config.data
  key = (d.cache_dir, d.data_dir, d.prepared_dir, d.generated_minutes, d.sample_rate, config.seed)
  if key not in _PREPARED:
    if jax.process_index() == 0:
      _prepare_here(config)
    partitioning.barrier("data_prepared")
    _PREPARED[key] = _prepare_here(config)  # a quick check where process 0's store is visible
  return _PREPARED[key]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _ignore_sigterm(worker_index, worker_count):
  """Grain workers leave SIGTERM to the trainer (a scheduler may signal the whole process
  group): the trainer still needs batches until the step at which all processes save.

  Ignoring SIGTERM, a worker would outlive a trainer that crashed or was SIGKILLed, holding
  its memory; on Linux the kernel kills it when its parent dies instead.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass
class BatchBuilder:
  """Builds this process's slice of global batch `k` (picklable for Grain workers)."""

  store: prepare.Store
  stage: str
  seed: int
  global_batch: int
  process_slice: tuple  # (first, count) within each global batch
  num_samples: int
  sample_rate: int
  encoder: str  # whose roll targets the encoder stage uses (hiermt.objectives)
  encoder_fps: int
  max_tokens: int
  augmenter: augment.Augmenter | None = None  # None: crops as recorded

  def __post_init__(self):
    durations = np.array([self.store.duration(i) for i in range(len(self.store))], np.float64)
    if not len(durations) or durations.sum() <= 0:
      raise ValueError(f"the {self.store.split!r} split of {self.store.prepared_dir} has no audio")
    self._probs = durations / durations.sum()
    self._notes = {}

  def _notes_of(self, piece):
    if piece not in self._notes:
      self._notes[piece] = self.store.notes(piece)
    return self._notes[piece]

  def crop(self, index):
    """(piece, start sample) of global example `index`: piece ~ duration, start 10 ms aligned."""
    rng = np.random.default_rng((self.seed, index))
    piece = int(rng.choice(len(self._probs), p=self._probs))
    hop = self.sample_rate // 100
    # At least half of every crop lies inside the piece.
    last = max(0, self.store.num_samples(piece) - self.num_samples // 2)
    start = int(rng.integers(0, last // hop + 1)) * hop
    return piece, start

  def example(self, index):
    """One training example as a dict of numpy arrays."""
    piece, start = self.crop(index)
    # The augmenter also hears what was played just before the crop (its reverberation).
    context = self.augmenter.context if self.augmenter is not None else 0
    lead = min(context, start)  # fewer samples precede a crop near the start of its piece
    audio = np.zeros(context + self.num_samples, np.int16)  # [context + samples]; zeros outside the piece
    chunk = self.store.audio(piece)[start - lead:start + self.num_samples]
    audio[context - lead:context - lead + len(chunk)] = chunk
    if self.augmenter is not None:
      audio = self.augmenter(audio, np.random.default_rng((self.seed, index, _AUGMENT_STREAM)))  # [samples]
    start_s = start / self.sample_rate
    notes = self._notes_of(piece)
    out = {"audio": audio}
    if self.stage == "encoder":
      num_frames = int(round(self.num_samples / self.sample_rate * self.encoder_fps)) + 1
      out.update(objectives.for_encoder(self.encoder).targets(notes, start_s, num_frames, self.encoder_fps))
    else:
      tokens, mask = vocabulary.encode_segment(notes, start_s, self.stage)
      tokens, mask, truncated = vocabulary.pad(tokens, mask, self.max_tokens)
      out.update(tokens=tokens.astype(np.int32), loss_mask=np.asarray(mask, np.float32),
                 truncated=np.bool_(truncated))
    return out

  def __call__(self, k):
    first, count = self.process_slice
    base = int(k) * self.global_batch + first
    examples = [self.example(base + j) for j in range(count)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def make_dataset(config, split, *, seed, num_batches=None, first_batch=0, process_index=None,
                 process_count=None):
  """A Grain IterDataset of per-process batches.

  Args:
    config: the run config.
    split: MAESTRO split to crop from.
    seed: crop seed (training uses config.seed; evaluation a fixed other seed).
    num_batches: finite length (evaluation), or None for an endless stream.
    first_batch: index of the first global batch: a run resumed at step k
      continues with batch k, whatever the process, device or worker count.
    process_index, process_count: default to this JAX process.
  Returns:
    A `grain.IterDataset`; its iterator also has `get_state`/`set_state`.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  global_batch = config.train.batch_size
  if global_batch % process_count:
    raise ValueError(f"train.batch_size={global_batch} must divide over {process_count} processes")
  per_process = global_batch // process_count
  builder = BatchBuilder(
      store=prepare.Store(prepared_dir(config), split), stage=config.stage, seed=seed, global_batch=global_batch,
      process_slice=(process_index * per_process, per_process),
      num_samples=int(round(config.data.segment_seconds * config.data.sample_rate)),
      sample_rate=config.data.sample_rate, encoder=config.encoder.name,
      encoder_fps=ENCODER_FPS[config.encoder.name],
      max_tokens=config.data.max_tokens,
      augmenter=(augment.Augmenter(config.data.augment.to_dict(), config.data.sample_rate)
                 if split == AUGMENTED_SPLIT and config.data.augment.enabled else None))
  length = num_batches if num_batches is not None else 2**40
  # One reader thread a process (or worker) and a short read-ahead: Grain's default
  # read-ahead of hundreds of elements would hold gigabytes of whole batches.
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.data.prefetch_batches)
  ds = grain.MapDataset.range(first_batch, first_batch + length).map(builder).to_iter_dataset(read)
  if config.data.worker_count > 0:
    # Grain's workers read its absl flags; outside an absl app (tests, notebooks) use defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.worker_count),
                        worker_init_fn=_ignore_sigterm)
  return ds
