"""The one config for every hiermt stage.

Usage:
  python -m hiermt.main --config=configs/base.py:STAGE[,encoder=crnn|hppnet][,size=SIZE]
      [,conditioning=prefix|cross][,runlocal] --workdir=DIR [--config.KEY=VALUE ...]

STAGE is one of encoder | onset_pitch | velocity | offset | flatten. `runlocal`
shrinks everything so a few steps train on a laptop CPU in seconds, on a tiny
generated corpus built on first use when no `data_dir` is set.
"""

import ml_collections

from hiermt import roll_notes

STAGES = ("encoder", "onset_pitch", "velocity", "offset", "flatten")
ENCODERS = ("crnn", "hppnet")
CONDITIONINGS = ("prefix", "cross")

# Paper Table II (layers, heads, dim, global batch) plus CPU-scale sizes.
DECODER_SIZES = {
    "nano": (2, 2, 64, 8),
    "micro": (2, 4, 128, 16),
    "tiny": (4, 8, 512, 64),
    "small": (6, 12, 768, 56),
    "base": (6, 16, 1024, 40),
    "large": (12, 32, 1024, 24),
}

# Each encoder's published optimiser for the encoder stage.
ENCODER_RECIPES = {
    # Kong et al., bytedance/piano_transcription pytorch/main.py + runme.sh: Adam with AMSGrad,
    # no weight decay, lr 5e-4 x 0.9 every 10k iterations, no clipping.
    "crnn": dict(optimizer="amsgrad", lr=5e-4, weight_decay=0.0, decay="step", decay_every=10_000,
                 decay_rate=0.9, grad_clip=0.0),
    # Wei et al., WX-Wei/HPPNet train.py: Adam lr 6e-4, StepLR(10k, 0.98). Its clip_grad_norm_(3)
    # runs after optimizer.step(), so it never changes an update: no clipping here either.
    "hppnet": dict(optimizer="adam", lr=6e-4, weight_decay=0.0, decay="step", decay_every=10_000,
                   decay_rate=0.98, grad_clip=0.0),
}

# Longest token sequence per stage (official code: 1024 for onsets, 1536 otherwise).
MAX_TOKENS = {"onset_pitch": 1024, "velocity": 1536, "offset": 1536, "flatten": 1536}


def _parse_arg(arg):
  """Parses 'STAGE[,key=value][,flag]' into a dict, failing loudly on typos."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  if not parts:
    raise ValueError(f"configs/base.py needs a stage: configs/base.py:STAGE with STAGE in {STAGES}")
  opts = {"stage": parts[0], "encoder": "crnn", "size": "base", "conditioning": "prefix", "runlocal": False}
  for part in parts[1:]:
    key, eq, value = part.partition("=")
    if key not in opts or key == "stage":
      raise ValueError(f"unknown config option {key!r}; valid: encoder=, size=, conditioning=, runlocal")
    opts[key] = value if eq else True
  choices = {"stage": STAGES, "encoder": ENCODERS, "size": tuple(DECODER_SIZES), "conditioning": CONDITIONINGS}
  for key, valid in choices.items():
    if opts[key] not in valid:
      raise ValueError(f"unknown {key} {opts[key]!r}; valid choices: {', '.join(valid)}")
  return opts


def get_config(arg=None):
  """Returns the ConfigDict for `arg` = 'STAGE[,encoder=...][,size=...][,conditioning=...][,runlocal]'."""
  opts = _parse_arg(arg)
  stage, runlocal = opts["stage"], opts["runlocal"]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  # --- data ---------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # MAESTRO-v3-layout folder (real or from hiermt.data.synth). Empty: a generated
  # corpus of `data.generated_minutes` is built into `data.cache_dir` on first use.
  c.data.data_dir = ""
  # hiermt's cache: generated corpora, the miditok MIDIs and compiled XLA programs.
  c.data.cache_dir = "~/.cache/hiermt"
  c.data.generated_minutes = 120.0
  # Where the random-access store lives; empty means DATA_DIR/hiermt_prepared.
  c.data.prepared_dir = ""
  c.data.sample_rate = 16000
  c.data.segment_seconds = 10.0
  # Grain worker processes (0: load in the training process) and batches read ahead by each.
  c.data.worker_count = 2
  c.data.prefetch_batches = 4
  c.data.max_tokens = MAX_TOKENS.get(stage, 0)
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  # On-the-fly waveform augmentation of crops of the MAESTRO "train" split only
  # (hiermt/data/augment.py): users' pianos, rooms and microphones are none we render.
  # Each effect has a probability; (low, high) ranges are drawn uniformly. An EQ or a room
  # costs FFTs over the whole crop (2-3 ms): their probabilities keep a loader thread fast.
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True
  c.data.augment.gain_prob = 1.0
  c.data.augment.gain_db = (-18.0, 6.0)
  c.data.augment.eq_prob = 0.25
  c.data.augment.eq_bands = 3  # 1..eq_bands bands, each a bell or a shelf
  c.data.augment.eq_hz = (60.0, 7000.0)  # band frequencies, log-uniform
  c.data.augment.eq_db = 9.0  # band gains in [-eq_db, eq_db]
  c.data.augment.eq_octaves = (0.3, 1.5)  # band widths
  c.data.augment.reverb_prob = 0.25
  c.data.augment.rt60_s = (0.1, 1.2)
  c.data.augment.predelay_s = (0.0, 0.03)
  c.data.augment.drr_db = (-3.0, 15.0)  # direct-to-reverberant energy ratio
  c.data.augment.noise_prob = 0.5
  c.data.augment.snr_db = (15.0, 50.0)
  c.data.augment.noise_slopes = (0.0, 1.0)  # noise power ~ f**-slope: white, pink

  # --- encoder ------------------------------------------------------------
  c.encoder = ml_collections.ConfigDict()
  c.encoder.name = opts["encoder"]
  # Encoder width multiplier and recurrent size; 1.0 / paper values are the real models.
  c.encoder.width = 1.0
  c.encoder.dropout = True
  c.freeze_encoder = False
  # Roll baseline (`transcribe --layout=roll`): thresholds of the encoder's published
  # post-processing (hiermt/roll_notes.py); Kong's CRNN also has an offset threshold.
  # HPPNet's `cut_at_onset`: a new onset of a key ends its sounding note (False: HPPNet's rule).
  c.roll = ml_collections.ConfigDict({**roll_notes.DEFAULT_THRESHOLDS[opts["encoder"]],
                                      **roll_notes.DEFAULT_RULES[opts["encoder"]]})

  # --- decoder ------------------------------------------------------------
  layers, heads, dim, batch = DECODER_SIZES[opts["size"]]
  c.decoder = ml_collections.ConfigDict()
  c.decoder.size = opts["size"]
  c.decoder.num_layers = layers
  c.decoder.num_heads = heads
  c.decoder.dim = dim
  c.decoder.conditioning = opts["conditioning"]
  # Average-pool the audio prefix in time by this factor (long prefixes on small machines).
  c.decoder.prefix_pool = 1
  # Start each time token's embedding and output column at the position code of the prefix
  # frame it names (prefix conditioning; hiermt/models/decoder.py): on the CPU recipe the
  # onset stage's validation loss fell 5.07 -> 4.03 in the same 4 minutes. False: the paper's init.
  c.decoder.time_init = False
  # Share of each attention head's features that RoPE rotates (1.0: all, the paper's decoder).
  c.decoder.rope_fraction = 1.0
  # Share (0-1) of the rotated features whose rotary positions are times (prefix frames at
  # their start, tokens at the latest time token) instead of sequence indices; prefix
  # conditioning. 0: the paper's positions. 1 (all) learnt faster on the CPU recipe for ~1000
  # steps, then fell behind (docs/design.md).
  c.decoder.rope_time = 0.0
  # Channels per key of the note reader (hiermt/models/note_reader.py): logit routes from
  # HPPNet's per-key rolls to the pitch, velocity and time tokens of the key in question.
  # 0: off, the paper's decoder (and the only choice with the CRNN, whose features are not per key).
  c.decoder.note_reader = 0
  # The note reader's onset roll prior: the next key, onset time or end of the notes as the
  # encoder's onset roll would have them, weighed by a learnt scalar that starts at 1
  # (hiermt/models/note_reader.py). Needs note_reader > 0; used by onset_pitch, the other stages
  # ignore it (an end time or a velocity follows their pitch tokens).
  c.decoder.onset_prior = False

  # --- decoding -----------------------------------------------------------
  c.decode = ml_collections.ConfigDict()
  # onset_pitch (hierarchy): a pitch token written with a lower probability among the tokens the
  # grammar allowed closes its onset time to further notes, and its note is left out
  # (hiermt.decode). 0: the paper's greedy decoding. transcribe/evaluate --min_pitch_prob override it.
  c.decode.min_pitch_prob = 0.0

  # --- optimisation -------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 12 if stage == "encoder" else batch  # global batch
  # A batch that does not split over devices x grad_accum is rounded up to the next multiple
  # (logged; config.json records it). False: such a batch is an error naming the valid values.
  c.train.round_batch = True
  c.train.steps = 300_000
  # LM stages: the official code's AdamW (lr 1e-4, decay 0.01, constant); the encoder
  # stage: its authors' recipe (ENCODER_RECIPES).
  c.train.optimizer = "adamw"  # adamw | adam | amsgrad
  c.train.lr = 1e-4
  c.train.weight_decay = 0.01  # adamw only; kernels and embeddings only
  c.train.warmup_steps = 0
  c.train.decay = "constant"  # constant | cosine | step
  c.train.decay_every = 10_000  # step decay: multiply the lr by decay_rate every decay_every steps
  c.train.decay_rate = 0.9
  c.train.grad_clip = 1.0  # global-norm clipping; 0 = none
  # Validate, keep and transcribe with an exponential moving average of the parameters (decay per
  # step, ramped up over a stage's first steps: hiermt/train.py `ema_update`); 0: the raw ones.
  c.train.ema_decay = 0.0
  if stage == "encoder":
    c.train.update(ENCODER_RECIPES[opts["encoder"]])
  # LM stages over a frozen encoder: encode this many training crops once and train the decoder on
  # random batches of them (hiermt/feature_pool.py); 0: every batch goes through the encoder.
  c.train.feature_pool = 0
  c.train.grad_accum = 1
  c.train.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.train.remat = False
  c.train.log_every = 100
  c.train.eval_every = 5000
  c.train.eval_batches = 8  # validation batches per evaluation (teacher-forced loss); 0: none
  # Validation pieces transcribed per evaluation for note F1 (hiermt/validation.py), each cut to
  # its first eval_seconds (0: whole pieces); the best-scored checkpoint is kept. 0 pieces: none.
  c.train.eval_pieces = 2
  c.train.eval_seconds = 0.0
  # Also evaluate the state a preemption (SIGTERM) saves, so that it can become the best one.
  # Off by default: a scheduler's grace period may not cover a transcription pass.
  c.train.eval_on_preemption = False
  # Encoder stage: choose the Roll thresholds on the validation pieces at each evaluation
  # (hiermt/roll_notes.py `calibrate`) and save them with the checkpoint for `transcribe`;
  # False keeps the config's `roll` thresholds (the published ones).
  c.train.calibrate_roll = True
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  # Parameter sharding over an `fsdp` mesh axis of this size (1: pure data parallel).
  c.train.fsdp = 1
  # Checkpoint whose encoder initialises an LM stage; empty means WORKDIR/encoder.
  c.init_from = ""

  if runlocal:
    # A few steps in seconds on one CPU (the tests force 8 devices and raise the batch to 8).
    c.data.generated_minutes = 3.0
    c.data.worker_count = 0
    c.data.augment.enabled = False  # smoke runs see the corpus as rendered
    c.data.max_tokens = 256
    c.encoder.width = 0.0625
    if opts["size"] == "base":  # the default size shrinks; an explicit size is kept
      c.decoder.size, (c.decoder.num_layers, c.decoder.num_heads, c.decoder.dim, _) = "nano", DECODER_SIZES["nano"]
    c.decoder.prefix_pool = 4
    c.train.batch_size = 2
    c.train.steps = 4
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.eval_batches = 1
    c.train.eval_pieces = 1
    c.train.eval_seconds = 10.0
    c.train.checkpoint_every = 2
  return c
