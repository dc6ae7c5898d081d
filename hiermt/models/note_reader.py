"""Note reader: direct routes from a per-key encoder's rolls to the decoder's logits.

The decoder sees the audio as prefix frames of 352 features (HPPNet's four
rolls for each of 88 keys). To describe a note it must find its key in them:
select the note's frame by attention, then decode one key's values out of the
whole frame vector, a product of the pitch token and the features that an MLP
learns slowly. On the CPU recipe the velocity and offset stages had not
learnt it after ~400 steps (predicted durations uncorrelated with the
reference; docs/design.md). The reader builds the lookup in:

* key states: two small convolutions along time, shared by all keys, turn
  each key's rolls into `channels` features per frame, `[batch, frames, 88, C]`;
* pitch route: at every position, each key's state at the time the sequence has
  reached (its latest time token) adds a logit to that key's pitch token —
  which keys start here;
* note route: at a pitch token, that key's state at that time adds a linear map
  to every logit (e.g. the `note_sustain` answer), and a quadratic in the
  velocity, a u + b u^2 for velocity u in [0, 1] with (a, b) read from the state —
  a bump around -a / 2b when b < 0, so one readout places the velocity;
* time route: at a pitch token, every time token's logit gets that key's
  readout at the frame the time names — where the key's note ends; and at
  every position the strongest key's second readout — where notes start;
* roll priors: at a pitch token, two learnt scalars weigh what the encoder's
  own rolls say of that note: its velocity roll where its onset roll peaks,
  at the note's frame or a neighbour (a heavy-tailed bump over the velocity
  tokens, -k log(1 + ((v - roll velocity) / 4)^2); HPPNet trains the
  velocity head on onset frames only) and where its frame roll lets it end
  (each end time's sum of the key's frame-roll log-odds from the note's
  frame on to the frame before it, whose argmax ends the note where its run
  of held frames ends; `note_sustain` gets the sum to the segment's end).
  With `onset_prior` (onset_pitch), a third scalar weighs where the onset
  roll says the next note is: each peak of a key's onset roll taken as an
  independent event of the roll's probability and listed as the sequence
  lists notes (by time, then rising key), the log-probability that the next
  pitch is key k (its onset, none on a free key below it), that the next onset
  time is t (none from the time reached up to t, one at t; each frame's odds
  shared by its time steps) and that none comes (`<eos>`).
  These are the Roll baseline's readings offered to the decoder from its
  first step: the learnt routes above need hundreds of steps to find them
  (docs/design.md);
* written keys: a key the sequence wrote within `WRITTEN_FRAMES` frames
  before a time does not count for that time's note starts, and its pitch
  token gets a learnt logit (`written`) at the time reached. At a pitch
  token its own time counts only keys above it (notes of one onset come by
  rising pitch). A chord's notes start a few ms apart, several 10 ms time
  tokens within one 20 ms frame: without this the keys already written say
  that notes still start there, and the model left a chord's other keys out
  (half the notes it missed on the recipe's validation pieces).

Every readout starts at zero; the onset prior starts at `ONSET_PRIOR_INIT` =
1, a proper distribution over what comes next; the end prior at weight 1
(`END_PRIOR_INIT`), where it decides the end: read from the rolls given the
reference onsets its argmax placed 59 % of the validation notes' ends right
(the first frame below 0.5: 57 %; the most probable end with the frames
taken as independent, the first form of this prior: 19 %), and from weight
1/4 or 0 the stage learnt it down and scored worse (docs/design.md);
the velocity prior starts at `VELOCITY_PRIOR_INIT` = 1, where its bump decides the argmax: at
CPU scale the velocity stage learnt on top of a weak (Gaussian, zero-init)
bump writes worse velocities on unseen pieces than the roll it reads, and the
heavy tail keeps a sharp bump at a sane loss (docs/design.md). The decoder
stays an autoregressive LM over the whole prefix; the reader only adds
logits computed from the same features.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiermt.models import hppnet

NUM_KEYS = 88
ROLLS = hppnet.ROLLS  # the rolls of each key, in the order of the features
# Velocity rolls are trained on MIDI velocity / 128 (HPPNet's targets).
VELOCITY_SCALE = 128.0
# Units of the roll priors' scalars, so that Adam's ~lr-sized steps reach a useful sharpness within a
# few hundred steps: the velocity bump's logit is -prior * log(1 + ((v - roll velocity) / VELOCITY_STEPS)^2),
# the end scores are multiplied by END_SCALE * prior.
VELOCITY_STEPS = 4.0
END_SCALE = 4.0
VELOCITY_PRIOR_INIT = 1.0
ONSET_PRIOR_INIT = 1.0
END_PRIOR_INIT = 1.0 / END_SCALE
# Onset probabilities are clipped this far from 0: the prior's no-onset odds of a frame multiply over
# 88 keys (1e-3 would leave every frame a 9 % chance of an onset).
ONSET_EPS = 1e-5
# Frame probabilities are clipped this far from 0 and 1 before their logs (sigmoid outputs round to 1).
PROB_EPS = 1e-3
KERNEL_FRAMES = 5  # each convolution sees +-2 frames (+-40 ms at 50 frames per second)
# A key written this many frames or fewer before a time has no new note there (40 ms: a key is
# not struck twice that fast, and a note's onset tolerance is 50 ms; notes.SAME_STROKE_SECONDS joins
# decoded notes by the same rule).
WRITTEN_FRAMES = 2


def written_times(tokens: jax.Array, times: jax.Array, key_tokens: tuple, start: jax.Array) -> jax.Array:
  """The time (in time-token steps) each key's pitch token was last written at, at or before each
  position; -1 where never.

  Args:
    tokens: int `[batch, n]`; `times` int `[batch, n]`, the time each position has reached.
    key_tokens: (first id, count) of the 88 keys' pitch tokens.
    start: int `[batch, 88]`, the value before `tokens` (-1 for a fresh sequence).

  Returns:
    int32 `[batch, n, 88]`.
  """
  key = tokens - key_tokens[0]  # [batch, n]
  hit = key[..., None] == jnp.arange(key_tokens[1])  # [batch, n, 88]
  marks = jnp.where(hit, times[..., None], -1)  # [batch, n, 88]
  return jnp.maximum(jax.lax.cummax(marks, axis=1), start[:, None]).astype(jnp.int32)


def _with_neighbours(x: jax.Array) -> jax.Array:
  """Each frame's value, then its previous and next frame's (-inf past the ends),
  `[batch, frames, 88]` -> `[batch, frames, 88, 3]`."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return jnp.stack([x, padded[:, :-2], padded[:, 2:]], axis=-1)


def _velocity_at_onset_peaks(onset: jax.Array, velocity: jax.Array) -> jax.Array:
  """Each frame's velocity roll read where the onset roll is highest among the frame and its two
  neighbours (the frame itself on ties), `onset`, `velocity` `[batch, frames, 88]` -> `[batch, frames, 88]`.

  HPPNet's velocity head is trained on onset frames only, so elsewhere it says little; a note's
  time token can land a frame before or after its onset's peak.
  """
  # The frame itself comes first, so that argmax keeps it on ties; past the ends is never highest.
  peak = jnp.argmax(_with_neighbours(onset), axis=-1)[..., None]  # [batch, frames, 88, 1]
  return jnp.take_along_axis(_with_neighbours(velocity), peak, axis=-1)[..., 0]


def _is_peak(x: jax.Array) -> jax.Array:
  """bool: frames at least as high as both neighbours (HPPNet's onset peaks), `[batch, frames, 88]`."""
  return x >= jnp.max(_with_neighbours(x), axis=-1)


def _peak_of_neighbours(x: jax.Array) -> jax.Array:
  """Each frame's highest value among itself and its two neighbours, `[batch, frames, 88]`."""
  return jnp.max(_with_neighbours(x), axis=-1)


def _gather_frames(x: jax.Array, frames: jax.Array) -> jax.Array:
  """x `[batch, frames, ...]` at each position's frame, frames int `[batch, n]` -> `[batch, n, ...]`."""
  index = frames.reshape(*frames.shape, *(1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


class NoteReader(nn.Module):
  """Key states from per-key features, and the logit routes they feed (module docstring).

  Attributes:
    channels: features per key and frame.
    vocab_size: logits per position.
    time_tokens: (first id, count, encoder frames per time token) of the time tokens.
    key_tokens: (first id, count) of the pitch tokens of the 88 keys, lowest first.
    velocity_tokens: (first id, count) of the velocity tokens, velocity 0 first.
    sustain_token: id of `note_sustain` (a note held past the segment's end).
    eos_token: id of `<eos>`; needed by `onset_prior`.
    end_prior: add the end prior over the end time and `note_sustain` after a pitch token, weighed
      by a learnt scalar that starts at END_PRIOR_INIT; for offset and flatten, whose pitch tokens
      are followed by the note's end (elsewhere its scores, hundreds of logits for a long note,
      would fight the next onset's or velocity's).
    onset_prior: add the onset roll prior over the next pitch, time and `<eos>` (`_onset_logp`),
      weighed by a learnt scalar that starts at ONSET_PRIOR_INIT; for onset_pitch, whose pitch tokens
      are followed by the next onset.
  """
  channels: int
  vocab_size: int
  time_tokens: tuple
  key_tokens: tuple
  velocity_tokens: tuple
  sustain_token: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  eos_token: int | None = None
  end_prior: bool = False
  onset_prior: bool = False

  def setup(self):
    conv = functools.partial(nn.Conv, self.channels, (KERNEL_FRAMES, 1), padding="SAME", dtype=self.dtype,
                             param_dtype=self.param_dtype)
    self.conv_in, self.conv_out = conv(name="conv_in"), conv(name="conv_out")
    dense = functools.partial(nn.Dense, use_bias=False, kernel_init=nn.initializers.zeros_init(),
                              dtype=self.dtype, param_dtype=self.param_dtype)
    self.key_readout = dense(3, name="key_readout")  # per key and frame: starts here, ends here, note starts
    self.note_readout = dense(self.vocab_size, name="note_readout")
    self.velocity_readout = dense(2, name="velocity_readout")  # (a, b) of a u + b u^2
    self.written = self.param("written", nn.initializers.zeros_init(), (), self.param_dtype)
    self.velocity_prior = self.param("velocity_prior", nn.initializers.constant(VELOCITY_PRIOR_INIT), (),
                                     self.param_dtype)
    if self.end_prior:
      self.end_weight = self.param("end_prior", nn.initializers.constant(END_PRIOR_INIT), (), self.param_dtype)
    if self.onset_prior:
      if self.eos_token is None:
        raise ValueError("NoteReader.onset_prior needs eos_token (the prior's last outcome is <eos>)")
      self.onset_weight = self.param("onset_prior", nn.initializers.constant(ONSET_PRIOR_INIT), (),
                                     self.param_dtype)

  def _rolls(self, features: jax.Array) -> jax.Array:
    """Encoder features `[batch, frames, 88 * 4]`, interleaved per key -> `[batch, frames, 88, 4]`."""
    batch, frames, width = features.shape
    if width != NUM_KEYS * len(ROLLS):
      raise ValueError(f"the note reader reads per-key encoder features (88 keys x HPPNet's {len(ROLLS)} rolls, "
                       f"{NUM_KEYS * len(ROLLS)}); got {width} features per frame. Use decoder.note_reader=0 "
                       "with this encoder")
    return features.reshape(batch, frames, NUM_KEYS, len(ROLLS))

  def states(self, features: jax.Array) -> jax.Array:
    """Encoder features `[batch, frames, 88 * 4]`, interleaved per key -> `[batch, frames, 88, C]`."""
    x = self._rolls(features).astype(self.dtype)  # [batch, frames, 88, rolls]
    return self.conv_out(nn.silu(self.conv_in(x)))  # [batch, frames, 88, C]

  def maps(self, features: jax.Array) -> dict:
    """What every position reads, computed once per audio (the decode cache keeps it): `read_rolls`
    of the key states and rolls of encoder features `[batch, frames, 88 * 4]`."""
    return self.read_rolls(self.states(features), self._rolls(features))

  def read_rolls(self, states: jax.Array, rolls: jax.Array) -> dict:
    """The maps of key `states` `[batch, frames, 88, C]` and `rolls` `[batch, frames, 88, 4]`: the
    states, their per-key start and end readouts `keys` `[batch, frames, 88, 2]`, each key's
    note-start readout `key_starts` `[batch, frames, 88]` and the strongest key's `starts`
    `[batch, frames]`; for the roll priors, each key's `velocity` roll and (`end_prior`) the running
    sum `held` of its frame roll's log-odds, both `[batch, frames, 88]`."""
    readouts = self.key_readout(states)  # [batch, frames, 88, 3]
    rolls = rolls.astype(jnp.float32)
    maps = {"states": states, "keys": readouts[..., :2], "key_starts": readouts[..., 2],
            "starts": jnp.max(readouts[..., 2], axis=2),
            "velocity": _velocity_at_onset_peaks(rolls[..., ROLLS.index("onset")], rolls[..., ROLLS.index("velocity")])}
    if self.end_prior:
      frame = jnp.clip(rolls[..., ROLLS.index("frame")], PROB_EPS, 1 - PROB_EPS)  # [batch, frames, 88]
      maps["held"] = jnp.cumsum(jnp.log(frame) - jnp.log1p(-frame), axis=1)
    if self.onset_prior:
      onset = jnp.clip(rolls[..., ROLLS.index("onset")], ONSET_EPS, 1 - PROB_EPS)  # [batch, frames, 88]
      # One event per peak of a key's onset roll (HPPNet's peak picking): the frames around a peak
      # belong to the same onset, not to further ones.
      onset = jnp.where(_is_peak(onset), onset, ONSET_EPS)
      peak = _peak_of_neighbours(onset)  # [batch, frames, 88]
      none = jnp.log1p(-onset)  # [batch, frames, 88]
      maps.update(onset_hit=jnp.log(peak), onset_pass=jnp.log1p(-peak), onset_none=none,
                  onset_none_all=jnp.sum(none, axis=-1))  # [batch, frames]: no key's onset
    return maps

  def _onset_logp(self, maps: dict, frames, done, free, ahead_frames, offset, time_frames) -> tuple:
    """The onset roll prior: log-probabilities of what comes next if every peak of a key's onset
    roll were an independent event of the roll's probability there and the sequence listed them in
    order (time, then rising key), skipping the keys written just before (`done`, `free`).

    Args:
      maps: `read_rolls` of the audio.
      frames: int `[batch, n]`, the frame of the time each position has reached.
      done: bool `[batch, n, 88]`, keys written within WRITTEN_FRAMES frames before it.
      free: bool `[batch, n, window, 88]`, the keys that can start at each of the `window` time
        steps from the time reached on (at a pitch token's own time, only keys above it).
      ahead_frames: int `[batch, n, window]`, those time steps' frames.
      offset: int `[batch, n, count]`, each time token's step minus the time reached.
      time_frames: int `[count]`, each time token's frame.

    Returns:
      `[batch, n, 88]`: the next key at the time reached is key j: its onset (the highest of its
      frame and neighbours: a chord's keys peak a frame apart) and no free key below it;
      `[batch, n, count]`: the next onset time is t >= the time reached: no free key's onset from
      the time reached up to t, and one at t (each frame's no-onset log-probability shared by the
      time steps in it; 0 before the time reached);
      `[batch, n]`: no onset from the time reached to the segment's end (`<eos>`).
    """
    hit = _gather_frames(maps["onset_hit"], frames)  # [batch, n, 88]
    passed = jnp.where(done, 0.0, _gather_frames(maps["onset_pass"], frames))  # [batch, n, 88]
    key_logp = jnp.where(done, math.log(ONSET_EPS), hit + jnp.cumsum(passed, axis=-1) - passed)
    none_ahead = jnp.take_along_axis(maps["onset_none"][:, None], ahead_frames[..., None], axis=2)  # [batch, n, window, 88]
    none_ahead = jnp.sum(jnp.where(free, none_ahead, 0.0), axis=-1)  # [batch, n, window]
    window = none_ahead.shape[-1]
    time_count, frames_per_time = self.time_tokens[1:]
    none_all = maps["onset_none_all"][:, None, time_frames]  # [batch, 1, count]
    none = jnp.where(offset < window, jnp.take_along_axis(none_ahead, jnp.clip(offset, 0, window - 1), axis=2),
                     none_all)  # [batch, n, count]
    # The last time token names the segment's end, where no note starts.
    onset_time = (offset >= 0) & (jnp.arange(time_count) < time_count - 1)  # [batch, n, count]
    none = jnp.where(onset_time, frames_per_time * none, 0.0)
    time_logp = jnp.cumsum(none, axis=-1) - none + jnp.log(-jnp.expm1(jnp.minimum(none, -1e-7)))
    return key_logp, jnp.where(onset_time, time_logp, 0.0), jnp.sum(none, axis=-1)

  def __call__(self, maps: dict, tokens: jax.Array, times: jax.Array, written: jax.Array) -> jax.Array:
    """Logit offsets `[batch, n, vocab]` for tokens `[batch, n]` whose sequence has reached
    `times` `[batch, n]` (in time-token steps; `decoder.token_times`) and written each key last at
    `written` `[batch, n, 88]` (`written_times`), given `maps`."""
    time_first, time_count, frames_per_time = self.time_tokens
    key_first, key_count = self.key_tokens
    velocity_first, velocity_count = self.velocity_tokens
    states, keys = maps["states"], maps["keys"]
    last_frame = states.shape[1] - 1
    key = tokens - key_first  # [batch, n]
    is_key = (key >= 0) & (key < key_count)  # [batch, n]
    key = jnp.clip(key, 0, key_count - 1)

    frame_of = lambda t: jnp.clip(jnp.floor(t * frames_per_time).astype(jnp.int32), 0, last_frame)  # noqa: E731
    frames = frame_of(times)  # [batch, n]
    written_frames = jnp.where(written >= 0, frame_of(written), -WRITTEN_FRAMES - 1)  # [batch, n, 88]
    done = written_frames >= frames[..., None] - WRITTEN_FRAMES  # [batch, n, 88]
    here = _gather_frames(keys[..., 0], frames) + self.written * done  # [batch, n, 88]
    note_state = jnp.take_along_axis(_gather_frames(states, frames), key[:, :, None, None], axis=2)[:, :, 0]
    note_state = jnp.where(is_key[..., None], note_state, 0)  # [batch, n, C]
    time_frames = frame_of(jnp.arange(time_count))  # [count]
    # Each position's key's values over all frames: x `[batch, frames, 88]` -> `[batch, n, frames]`.
    over_frames = lambda x: jnp.take_along_axis(x[:, None], key[:, :, None, None], axis=3)[..., 0]  # noqa: E731
    ends = over_frames(keys[..., 1])  # [batch, n, frames]
    ends = jnp.where(is_key[..., None], ends, 0)
    # The times within WRITTEN_FRAMES frames after the time reached: their strongest note start among
    # the keys not written just before them (at a pitch token's own time, above it too; 0: no key).
    window = math.ceil((WRITTEN_FRAMES + 1) / frames_per_time)  # later times are past every written key
    ahead = times[..., None] + jnp.arange(window)  # [batch, n, window] time steps
    ahead_frames = frame_of(ahead)  # [batch, n, window]
    free = written_frames[:, :, None] < ahead_frames[..., None] - WRITTEN_FRAMES  # [batch, n, window, 88]
    higher = (jnp.arange(window)[:, None] > 0) | (jnp.arange(key_count) > key[..., None, None])
    free &= higher | ~is_key[..., None, None]
    starts_ahead = jnp.take_along_axis(maps["key_starts"][:, None], ahead_frames[..., None], axis=2)  # [batch, n, window, 88]
    starts_ahead = jnp.where(jnp.any(free, -1), jnp.max(jnp.where(free, starts_ahead, -jnp.inf), -1), 0.0)
    offset = jnp.arange(time_count)[None, None] - times[..., None]  # [batch, n, count]
    starts = jnp.where((offset >= 0) & (offset < window),
                       jnp.take_along_axis(starts_ahead, jnp.clip(offset, 0, window - 1), axis=2),
                       maps["starts"][:, None, time_frames])  # [batch, n, count]
    time_bias = ends[:, :, time_frames] + starts  # [batch, n, count]
    if self.onset_prior:
      key_logp, time_logp, eos_logp = self._onset_logp(maps, frames, done, free, ahead_frames, offset, time_frames)
      here += self.onset_weight * key_logp
      time_bias += self.onset_weight * time_logp

    u = jnp.arange(velocity_count, dtype=jnp.float32) / (velocity_count - 1)  # [count]
    velocity_bias = self.velocity_readout(note_state).astype(jnp.float32) @ jnp.stack([u, u * u])  # [batch, n, count]

    # Roll priors of the note at a pitch token: its key's rolls from its frame f0 on.
    # [batch, n, 1]: the key's velocity roll at the note's frame
    velocity_roll = jnp.take_along_axis(_gather_frames(maps["velocity"], frames), key[..., None], axis=2)
    miss = (jnp.arange(velocity_count) - VELOCITY_SCALE * velocity_roll) / VELOCITY_STEPS  # [batch, n, count]
    velocity_bias -= jnp.where(is_key[..., None], self.velocity_prior * jnp.log1p(miss * miss), 0)
    bias = self.note_readout(note_state).astype(jnp.float32)  # [batch, n, vocab]
    if self.end_prior:
      held = over_frames(maps["held"])  # [batch, n, frames]
      # Ending at frame e > f0: the frame roll's log-odds summed over f0 + 1 .. e - 1 (HPPNet's roll rule
      # starts at f0 + 1), whose argmax is the end of the run of held frames (module docstring).
      held_f0 = jnp.take_along_axis(held, frames[..., None], axis=2)  # [batch, n, 1]
      ends_at = jnp.clip(jnp.maximum(time_frames, frames[..., None] + 1), 0, last_frame)  # [batch, n, count]
      end_score = jnp.take_along_axis(held, jnp.maximum(ends_at - 1, frames[..., None]), axis=2) - held_f0
      held_through = held[..., -1] - held_f0[..., 0]  # [batch, n]: held past the last frame
      end_weight = jnp.where(is_key, END_SCALE * self.end_weight, 0)[..., None]  # [batch, n, 1]
      time_bias += end_weight * end_score  # [batch, n, count]
      bias = bias.at[..., self.sustain_token].add(end_weight[..., 0] * held_through)
    if self.onset_prior:
      bias = bias.at[..., self.eos_token].add(self.onset_weight * eos_logp)
    bias = bias.at[..., velocity_first:velocity_first + velocity_count].add(velocity_bias)
    bias = bias.at[..., key_first:key_first + key_count].add(here)
    return bias.at[..., time_first:time_first + time_count].add(time_bias)
