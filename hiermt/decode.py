"""Greedy note-token decoding for every stage: KV-cached, batched, jitted.

Two loops serve the four stage layouts (`vocabulary.LAYOUTS`):

* **free** (`onset_pitch`, `flatten`): from `<sos> <task>` the model writes
  every token, one per step, until each sequence of the batch has written
  `<eos>` or `max_len` tokens. Each step feeds one token through the KV cache.
* **forced** (`velocity`, `offset`): the `on pitch` tokens of every note are
  known (stage 1, or carried notes); only the answer slot is generated. The
  prefill feeds `<sos> <task> on_0 pitch_0`; every later step feeds the chunk
  `answer_{i-1} on_i pitch_i` and reads one answer, so a segment of n notes
  costs n decoder calls (not 3n).

Both are one `lax.while_loop` over a batch of segments with fixed shapes: it
stops early once every row has finished, and the loop body is the same
whatever the stage, conditioning (`prefix`, `cross`) or size.

A small grammar (`allowed_tokens`) masks impossible tokens before the argmax:
a time where a time must come and a pitch where a pitch must come; onset times
never go backwards within a segment and notes of one onset come in rising
pitch (so a sequence cannot repeat a note); `note_sustain` onsets only before
the first timed onset (carried notes are listed first), by rising pitch and
only at pitches the caller says may still sound (`carriable`: none in a
piece's first segment, the encoder's frame roll at the start of later ones;
without it a model that opens every segment with carried notes writes nothing
else, and stitching drops them); offsets after their
onset (a carried note's offset at step >= 1); velocities 1..127; `<eos>` only
between notes; pitches within the piano's 88 keys.

Free decoding also returns each written token's probability among the tokens
the grammar allowed. With `min_pitch_prob` (`decode.min_pitch_prob` in the
config, hierarchy only) a note whose pitch falls below it closes its onset
time to further notes, and `drop_unsure_notes` leaves it out afterwards.

`decode_uncached` is the official code's strategy — full recompute of the
sequence for every token, one forward pass per note in stages 2-3 — with the
same grammar: tests check that it writes exactly the tokens of the cached
loops, and `benchmark --what=decode` times both.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hiermt import vocabulary as vocab
from hiermt.models import transcriber

FREE_STAGES = ("onset_pitch", "flatten")
FORCED_STAGES = ("velocity", "offset")
LOWEST_PIANO_PITCH, HIGHEST_PIANO_PITCH = 21, 108
# Onsets lie in the half-open segment [0, 1000) (vocabulary.encode_segment).
LAST_ONSET_STEP = vocab.SEGMENT_STEPS - 1


@flax.struct.dataclass
class GrammarState:
  """Where each sequence of a batch stands in its note grammar; every field [batch] int32/bool."""
  slot: jax.Array  # next slot of the note group, 0..group_length-1
  current_onset: jax.Array  # onset step of the open group; SUSTAIN_STEP for note_sustain
  previous_onset: jax.Array  # onset step of the last timed note, -1 before the first
  previous_pitch: jax.Array  # pitch of the last timed note, -1 before the first
  timed: jax.Array  # bool: a timed onset has been written (no more note_sustain onsets)
  carriable: jax.Array  # bool [batch, NUM_PITCHES]: pitches a further carried note may have
  closed: jax.Array  # bool: the last timed note's pitch was unsure; no further note at its onset

  @classmethod
  def start(cls, batch: int, carriable=None) -> "GrammarState":
    """The state before the first note group; `carriable` bool [batch, NUM_PITCHES] (default: all)."""
    minus_one = jnp.full((batch,), -1, jnp.int32)
    if carriable is None:
      carriable = jnp.ones((batch, vocab.NUM_PITCHES), bool)
    no = jnp.zeros((batch,), bool)
    return cls(jnp.zeros((batch,), jnp.int32), minus_one, minus_one, minus_one, no, jnp.asarray(carriable, bool), no)


_IDS = np.arange(vocab.VOCAB_SIZE)
_STEP = _IDS - vocab.TIME_OFFSET  # time step of a time id (garbage elsewhere)
_IS_TIME = (_IDS >= vocab.TIME_OFFSET) & (_IDS < vocab.TIME_OFFSET + vocab.NUM_TIMES)
_PITCH = _IDS - vocab.PITCH_OFFSET
_IS_PIANO_PITCH = (_PITCH >= LOWEST_PIANO_PITCH) & (_PITCH <= HIGHEST_PIANO_PITCH)
_VELOCITY = _IDS - vocab.VELOCITY_OFFSET
_IS_VELOCITY = (_VELOCITY >= 1) & (_VELOCITY < vocab.NUM_VELOCITIES)
_IS_SUSTAIN = _IDS == vocab.NOTE_SUSTAIN
_IS_EOS = _IDS == vocab.EOS


def _pitch_ids(pitches: jax.Array) -> jax.Array:
  """bool [batch, NUM_PITCHES] over MIDI pitches -> bool [batch, vocab] over token ids."""
  return jnp.pad(pitches, ((0, 0), (vocab.PITCH_OFFSET, vocab.VOCAB_SIZE - vocab.PITCH_OFFSET - vocab.NUM_PITCHES)))


def _field_mask(stage: str, field: str, state: GrammarState) -> jax.Array:
  """bool [batch, vocab]: ids allowed in a slot holding `field`, given each row's state."""
  step, pitch = jnp.asarray(_STEP)[None], jnp.asarray(_PITCH)[None]  # [1, vocab]
  col = lambda x: x[:, None]  # noqa: E731  [batch] -> [batch, 1]
  sustain_ok = "sustain" in vocab.LAYOUTS[stage][0]
  if field == "onset":
    # A further note at the previous onset needs a higher pitch; after the top key there is none,
    # nor after an unsure pitch (`closed`).
    first = jnp.where((state.previous_pitch >= HIGHEST_PIANO_PITCH) | state.closed, state.previous_onset + 1,
                      jnp.maximum(state.previous_onset, 0))
    timed = jnp.asarray(_IS_TIME)[None] & (step >= col(first)) & (step <= LAST_ONSET_STEP)
    can_carry = ~state.timed & jnp.any(state.carriable[:, LOWEST_PIANO_PITCH:HIGHEST_PIANO_PITCH + 1], axis=1)
    carried = jnp.asarray(_IS_SUSTAIN)[None] & col(can_carry) if sustain_ok else False
    return timed | carried | jnp.asarray(_IS_EOS)[None]
  if field == "pitch":
    carried = col(state.current_onset == vocab.SUSTAIN_STEP)
    same_onset = col(state.current_onset == state.previous_onset)
    lowest = jnp.where(same_onset, col(state.previous_pitch) + 1, 0)
    timed_ok = pitch >= lowest
    return jnp.asarray(_IS_PIANO_PITCH)[None] & jnp.where(carried, _pitch_ids(state.carriable), timed_ok)
  if field == "offset":
    # A carried note still sounding at the segment start ended no earlier than step 1.
    first = jnp.where(state.current_onset == vocab.SUSTAIN_STEP, 1, state.current_onset + 1)
    return (jnp.asarray(_IS_TIME)[None] & (step >= col(first))) | jnp.asarray(_IS_SUSTAIN)[None]
  if field == "velocity":
    return jnp.broadcast_to(jnp.asarray(_IS_VELOCITY)[None], (state.slot.shape[0], vocab.VOCAB_SIZE))
  raise ValueError(f"unknown field {field!r}")


def allowed_tokens(stage: str, state: GrammarState) -> jax.Array:
  """The grammar: bool [batch, vocab], the ids each row may write next."""
  fields = vocab.FIELDS[stage]
  masks = jnp.stack([_field_mask(stage, f, state) for f in fields])  # [group_length, batch, vocab]
  return jnp.take_along_axis(masks, state.slot[None, :, None], axis=0)[0]


def advance(stage: str, state: GrammarState, token: jax.Array, unsure=None) -> GrammarState:
  """The state after each row writes `token` [batch] (its slot's field); `unsure` (bool [batch], or
  None for none) marks tokens written below the caller's confidence: an unsure timed pitch closes its
  onset time to further notes."""
  fields = vocab.FIELDS[stage]
  field_at = lambda name: state.slot == fields.index(name)  # noqa: E731
  is_onset, is_pitch = field_at("onset"), field_at("pitch")
  onset = jnp.where(token == vocab.NOTE_SUSTAIN, vocab.SUSTAIN_STEP, token - vocab.TIME_OFFSET)
  current_onset = jnp.where(is_onset, onset, state.current_onset)
  carried = state.current_onset == vocab.SUSTAIN_STEP
  pitch = token - vocab.PITCH_OFFSET
  return GrammarState(
      slot=(state.slot + 1) % len(fields),
      current_onset=current_onset,
      previous_onset=jnp.where(is_pitch & ~carried, state.current_onset, state.previous_onset),
      previous_pitch=jnp.where(is_pitch & ~carried, pitch, state.previous_pitch),
      timed=state.timed | (is_onset & (token != vocab.NOTE_SUSTAIN) & (token != vocab.EOS)),
      # Carried notes come by rising pitch, one per pitch.
      carriable=jnp.where((is_pitch & carried)[:, None],
                          state.carriable & (jnp.arange(vocab.NUM_PITCHES)[None] > pitch[:, None]), state.carriable),
      closed=jnp.where(is_pitch & ~carried, False if unsure is None else unsure, state.closed),
  )


def _pick(logits: jax.Array, allowed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Greedy choice among allowed ids from logits/allowed [batch, vocab]: (int32 [batch], the chosen
  id's probability under the softmax over the allowed ids, float32 [batch])."""
  masked = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)  # [batch, vocab]
  token = jnp.argmax(masked, axis=-1).astype(jnp.int32)
  log_prob = jnp.take_along_axis(masked, token[:, None], axis=1)[:, 0] - jax.nn.logsumexp(masked, axis=-1)
  return token, jnp.exp(log_prob)


def drop_unsure_notes(tokens, probs, min_pitch_prob: float):
  """onset_pitch tokens without the notes whose pitch the model was unsure of.

  Greedy decoding can write a note at every onset time it finds, pitch after
  pitch (the grammar only asks notes of one onset to rise in pitch); the wrong
  ones tend to be the unlikely ones. A note whose pitch token had probability
  below `min_pitch_prob` (`free_run`'s probabilities) has its time and pitch
  tokens replaced by PAD, which `vocabulary.decode_segment` skips.

  Args:
    tokens: int [batch, length] onset_pitch sequences as `free_run` writes them.
    probs: float [batch, length], each token's probability.
    min_pitch_prob: 0 keeps every note.

  Returns:
    int32 [batch, length] numpy.
  """
  tokens, probs = np.asarray(tokens), np.asarray(probs)
  is_pitch = (tokens >= vocab.PITCH_OFFSET) & (tokens < vocab.PITCH_OFFSET + vocab.NUM_PITCHES)
  unsure = is_pitch & (probs < min_pitch_prob)  # [batch, length]
  drop = unsure.copy()
  drop[:, :-1] |= unsure[:, 1:]  # the note's time token, just before its pitch
  return np.where(drop, vocab.PAD, tokens).astype(np.int32)


def _free_allowed(stage: str, state: GrammarState, stop_at_eos: bool) -> jax.Array:
  """bool [batch, vocab]: the grammar of a free stage, with `<eos>` banned unless `stop_at_eos`."""
  allowed = allowed_tokens(stage, state)
  return allowed if stop_at_eos else allowed.at[:, vocab.EOS].set(False)


def _answer_state(on_tokens):
  """Grammar state at the answer slot of notes whose onset tokens are `on_tokens` [batch]."""
  state = GrammarState.start(on_tokens.shape[0])
  onset = jnp.where(on_tokens == vocab.NOTE_SUSTAIN, vocab.SUSTAIN_STEP, on_tokens - vocab.TIME_OFFSET)
  return state.replace(slot=jnp.full_like(state.slot, 2), current_onset=onset)


def _prompt(stage, batch):
  return jnp.tile(jnp.asarray([[vocab.SOS, vocab.TASK_IDS[stage]]], jnp.int32), (batch, 1))  # [batch, 2]


# ----------------------------------------------------------------------------
# Cached loops
# ----------------------------------------------------------------------------
def _decode_call(model, params, cache, tokens, features=None):
  """One KV-cached decoder call: (logits [batch, n, vocab], new cache)."""
  logits, mutated = model.apply({"params": params, "cache": cache}, tokens, features,
                                method=transcriber.Transcriber.decode, mutable=["cache"])
  return logits, mutated["cache"]


def free_run(model, stage: str, max_len: int, params, features, carriable=None, min_pitch_prob=0.0,
             stop_at_eos: bool = True):
  """Free greedy decoding of a batch of segments (`onset_pitch` or `flatten`).

  Args:
    model: the stage's `Transcriber` (its decoder's max_len >= `max_len`).
    stage: "onset_pitch" or "flatten".
    max_len: tokens per sequence, `<sos> <task>` and `<eos>` included (> 2).
    params: the stage's parameters.
    features: encoder features [batch, frames, d_enc].
    carriable: bool [batch, NUM_PITCHES], the pitches each segment may list as carried in
      (`flatten`); None: any.
    min_pitch_prob: a timed note whose pitch is written with a lower probability closes its
      onset time: the next note must start later (0: never). `drop_unsure_notes` with the
      same value then leaves the note out.
    stop_at_eos: False masks `<eos>`, so every row writes exactly `max_len`
      tokens: benchmarks use it to time a chosen token count with untrained weights.

  Returns:
    (tokens, probs): tokens int32 [batch, max_len], `<sos> <task> ... <eos>`
    then PAD (a row without `<eos>` ran out of room: truncated); probs float32
    [batch, max_len], each written token's probability among the ids the
    grammar allowed (0 for the prompt and PAD).
  """
  if stage not in FREE_STAGES:
    raise ValueError(f"free_run decodes {FREE_STAGES}, not {stage!r}")
  if max_len < 3:
    raise ValueError(f"max_len={max_len} leaves no room for a token after <sos> <task>")
  batch = features.shape[0]
  prompt = _prompt(stage, batch)
  written = (jnp.full((batch, max_len), vocab.PAD, jnp.int32).at[:, :2].set(prompt),  # tokens
             jnp.zeros((batch, max_len), jnp.float32))  # their probabilities

  def write(position, logits, written, state, done):
    """Picks every row's token at `position` (PAD once a row is done) from the previous token's logits."""
    token, prob = _pick(logits, _free_allowed(stage, state, stop_at_eos))  # [batch]
    token, prob = jnp.where(done, vocab.PAD, token), jnp.where(done, 0.0, prob)
    written = tuple(jax.lax.dynamic_update_slice(x, y[:, None], (0, position))
                    for x, y in zip(written, (token, prob)))
    return written, advance(stage, state, token, prob < min_pitch_prob), done | (token == vocab.EOS)

  def cond(carry):
    position, _, _, _, done = carry
    return (position + 1 < max_len) & ~jnp.all(done)

  def body(carry):
    # The token written last goes in, the one after it comes out: no call is spent on the final token.
    position, written, cache, state, done = carry
    last = jax.lax.dynamic_slice_in_dim(written[0], position, 1, axis=1)  # [batch, 1]
    logits, cache = _decode_call(model, params, cache, last)
    written, state, done = write(position + 1, logits[:, -1], written, state, done)
    return position + 1, written, cache, state, done

  logits, cache = _decode_call(model, params, model.init_cache(features), prompt, features)
  state = GrammarState.start(batch, carriable)
  written, state, done = write(2, logits[:, -1], written, state, jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, (jnp.asarray(2, jnp.int32), written, cache, state, done))[1]


def forced_run(model, stage: str, params, features, on_tokens, pitch_tokens, num_notes):
  """Answers of a batch of segments whose `on pitch` tokens are given (`velocity` or `offset`).

  Args:
    model: the stage's `Transcriber`; its decoder must hold 2 + 3 * notes tokens.
    stage: "velocity" or "offset".
    params: the stage's parameters.
    features: encoder features [batch, frames, d_enc].
    on_tokens, pitch_tokens: int32 [batch, notes], each row's notes in sequence
      order (`vocabulary.encode_segment`); entries past `num_notes` are ignored.
    num_notes: int32 [batch], notes per row.

  Returns:
    int32 [batch, notes]: the answer token of every note (velocity id, or
    offset time id / note_sustain); PAD past `num_notes`.
  """
  if stage not in FORCED_STAGES:
    raise ValueError(f"forced_run decodes {FORCED_STAGES}, not {stage!r}")
  batch, notes = on_tokens.shape
  note = lambda tokens, i: jax.lax.dynamic_index_in_dim(tokens, i, axis=1, keepdims=False)  # noqa: E731  [batch]

  def write(i, logits, answers):
    """Picks every row's answer to note `i` (PAD past its notes) from the logits after its pitch token."""
    answer = _pick(logits, allowed_tokens(stage, _answer_state(note(on_tokens, i))))[0]  # [batch]
    answer = jnp.where(i < num_notes, answer, vocab.PAD)
    return jax.lax.dynamic_update_slice(answers, answer[:, None], (0, i))

  def body(carry):
    # Note i's chunk: the previous answer, then its known tokens. The last answer costs no further call.
    i, answers, cache = carry
    chunk = jnp.stack([note(answers, i - 1), note(on_tokens, i), note(pitch_tokens, i)], axis=1)  # [batch, 3]
    logits, cache = _decode_call(model, params, cache, chunk)
    return i + 1, write(i, logits[:, -1], answers), cache

  prompt = jnp.concatenate([_prompt(stage, batch), on_tokens[:, :1], pitch_tokens[:, :1]], axis=1)  # [batch, 4]
  logits, cache = _decode_call(model, params, model.init_cache(features), prompt, features)
  answers = write(0, logits[:, -1], jnp.full((batch, notes), vocab.PAD, jnp.int32))
  last = jnp.max(num_notes)
  return jax.lax.while_loop(lambda carry: carry[0] < last, body, (jnp.asarray(1, jnp.int32), answers, cache))[1]


# ----------------------------------------------------------------------------
# The official strategy (reference and benchmark baseline)
# ----------------------------------------------------------------------------
def decode_uncached(model, stage, max_len, params, features, on_tokens=None, pitch_tokens=None,
                    num_notes=None, stop_at_eos: bool = True, carriable=None, min_pitch_prob=0.0):
  """Greedy decoding by full recompute: one segment at a time, every step re-runs the whole sequence.

  Same arguments and results as `free_run` / `forced_run` (numpy in, numpy
  out); forced stages run one forward pass per note, as the official code.
  Forward passes are compiled once per model and sequence length.
  """
  forward = _uncached_forward(model)
  features = np.asarray(features)
  if stage in FREE_STAGES:
    out = np.full((features.shape[0], max_len), vocab.PAD, np.int32)
    probs = np.zeros(out.shape, np.float32)
    for b in range(features.shape[0]):
      sequence = [vocab.SOS, vocab.TASK_IDS[stage]]
      state = GrammarState.start(1, None if carriable is None else carriable[b:b + 1])
      while len(sequence) < max_len:
        logits = forward(params, jnp.asarray([sequence], jnp.int32), features[b:b + 1])
        token, prob = _pick(logits, _free_allowed(stage, state, stop_at_eos))
        probs[b, len(sequence)] = float(prob[0])
        sequence.append(int(token[0]))
        state = advance(stage, state, token, prob < min_pitch_prob)
        if sequence[-1] == vocab.EOS:
          break
      out[b, :len(sequence)] = sequence
    return out, probs
  out = np.full(on_tokens.shape, vocab.PAD, np.int32)
  for b in range(features.shape[0]):
    sequence = [vocab.SOS, vocab.TASK_IDS[stage]]
    for i in range(int(num_notes[b])):
      sequence += [int(on_tokens[b, i]), int(pitch_tokens[b, i])]
      logits = forward(params, jnp.asarray([sequence], jnp.int32), features[b:b + 1])
      answer = _pick(logits, allowed_tokens(stage, _answer_state(jnp.asarray(on_tokens[b, i:i + 1]))))[0]
      out[b, i] = int(answer[0])
      sequence.append(out[b, i])
  return out


@functools.cache
def _uncached_forward(model):
  """jitted (params, tokens [1, n], features [1, frames, d]) -> logits [1, vocab] of the last token."""

  def forward(params, tokens, features):
    logits = model.apply({"params": params}, tokens, features,
                         method=lambda m, t, f: m.decoder(t, f))  # [1, n, vocab]
    return logits[:, -1]

  return jax.jit(forward)


def weights_in_compute_dtype(model, params):
  """`params` with every matrix (kernels, embeddings) in the decoder's compute dtype.

  Each decoder call of a decoding loop reads all the weights for a handful of
  tokens, so its time is mostly memory traffic: in bfloat16 the loop reads
  half the bytes (on this project's CPU, decoding a piece took 0.63x the
  float32 time). Vectors (biases, norm scales) keep their dtype. float32
  models get `params` unchanged.
  """
  dtype = model.decoder.dtype
  if dtype == jnp.float32:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)


def jitted(model, stage: str, max_len: int, stop_at_eos: bool = True):
  """The stage's cached decoding loop, jitted (one compilation per input shape).

  Returns `fn(params, features[, carriable[, min_pitch_prob]]) -> (tokens, probs)` for free
  stages (see `free_run` for `carriable`, `min_pitch_prob` and `stop_at_eos`) and
  `fn(params, features, on_tokens, pitch_tokens, num_notes) -> answers` for forced ones. The
  weights are cast to the model's compute dtype once per call, before the loop
  (`weights_in_compute_dtype`).
  """
  if stage in FREE_STAGES:
    run = functools.partial(free_run, model, stage, max_len, stop_at_eos=stop_at_eos)
  else:
    run = functools.partial(forced_run, model, stage)
  return jax.jit(lambda params, *args: run(weights_in_compute_dtype(model, params), *args))
