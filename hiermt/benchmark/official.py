"""`--what=vs_official` and the official side of `--what=decode`: the official PyTorch code, timed.

The official code (github.com/LiDCC/Improving-piano-transcription-by-LLM-based-decoder)
is never part of hiermt: this module loads its `models/enc_dec.py` (the
cross-attention decoder `EncDecPos`) and `data/tokenizers.py` by path from a
checkout the user supplies, and runs it under a Python that has PyTorch (the
PyTorch wheel on hand may not match hiermt's Python, so `torch_python` can name
another interpreter, e.g. `python3.11 -m venv /tmp/torchvenv` with torch (a CPU
build) and numpy installed).

Training step (`compare`, `--what=vs_official`). Both sides train the same
model on the same shapes: the paper size's layers/heads/dim, the official
vocabulary (6504 ids, read from the checkout), random precomputed CRNN features
`[batch, 1001, 1536]` (a 10 s segment at 100 fps; no encoder on either side),
`batch` x `tokens` random token ids, next-token cross-entropy, and AdamW (lr
1e-4, weight decay 0.01, no clipping) in float32. One step is forward +
backward + optimiser update; each side runs one warm-up step, timed on its own
(for hiermt it includes compilation), then `steps` timed ones summarised by
their median. Each side runs in its own fresh process, one after the other,
pinned to the same `threads` CPUs, so the peak RSS is that side's alone. Both
processes inherit this one's environment, so e.g. an LD_PRELOAD'ed allocator
or XLA_FLAGS apply to both (XLA_FLAGS only matters to hiermt).

Decoding (`decode_official`, the official side of `--what=decode`): the
official inference scripts' generation loops, run with `EncDecPos` at random
weights, as they are written (inference_llama_mt_{on,vel,off}_{crnn,hpp}.py,
inference_flatten_{crnn,hpp}.py):
  onset_pitch  `generate_in_batch` on 15 segments at once (a 150 s clip, the
               last one zero-padded), each new token a full forward pass of the
               whole sequence, until every row wrote `<eos>`;
  velocity,    one segment at a time; per note, its `time pitch` tokens are
  offset       appended and `generate_in_batch(max_new_tokens=1)` re-runs the
               whole sequence for the answer (one forward pass per note);
  flatten      `generate_in_batch` on one segment at a time.
Untrained weights never write `<eos>` on cue, so free stages are given
`end_token=-1` (no row ever ends) and `max_new_tokens` = the token count under
test: the same loop, a chosen length.

This file is also the worker both processes run, so its top level imports only
the standard library: the official side's interpreter has neither jax nor hiermt.
"""

import functools
import importlib.util
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Square float32 matmul that measures each framework's matmul rate on the pinned CPUs.
PEAK_MATMUL_SIZE = 2048

OFFICIAL_DECODER = "models/enc_dec.py"
OFFICIAL_TOKENIZER = "data/tokenizers.py"
# Official training settings (train_llama_mt_on_crnn.py): CRNN features of a 10 s segment.
FRAMES = 1001
FEATURE_DIM = 1536
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01  # PyTorch AdamW's default, which the official code keeps
SIDES = ("official", "hiermt", "official_decode")
# Decoding (the official inference scripts): segments stage 1 decodes at once,
# and `max_token_len` per encoder and stage (the model's block_size is one more).
ONSET_BATCH = 15
MAX_TOKENS = {"crnn": {"onset_pitch": 1024, "velocity": 1024, "offset": 1024, "flatten": 2000},
              "hppnet": {"onset_pitch": 1024, "velocity": 2000, "offset": 2000, "flatten": 1024}}
TASKS = {"onset_pitch": "task=onset", "velocity": "task=velocity", "offset": "task=offset", "flatten": "task=flatten"}
# Tokens one note adds to a stage's sequence; the free stages write them all.
TOKENS_PER_NOTE = {"onset_pitch": 2, "velocity": 3, "offset": 3, "flatten": 4}
FREE_STAGES = ("onset_pitch", "flatten")
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_TORCH_HINT = ("python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install numpy torch "
               "--extra-index-url https://download.pytorch.org/whl/cpu, "
               "then pass torch_python=/tmp/torchvenv/bin/python")


def _load_by_path(path: pathlib.Path, name: str):
  """Imports one source file as a module without putting its folder on sys.path."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _official_file(official_repo, relative) -> pathlib.Path:
  path = pathlib.Path(official_repo).expanduser() / relative
  if not path.is_file():
    raise ValueError(f"{path} not found: official_repo must be a checkout of "
                     "github.com/LiDCC/Improving-piano-transcription-by-LLM-based-decoder")
  return path


def official_vocab_size(official_repo) -> int:
  """Size of the official token vocabulary (`data/tokenizers.py: Tokenizer`, 6504 at their HEAD)."""
  tokenizers = _load_by_path(_official_file(official_repo, OFFICIAL_TOKENIZER), "official_tokenizers")
  return int(tokenizers.Tokenizer().vocab_size)


def _torch_python(torch_python) -> str:
  """`torch_python` (None: this interpreter), checked to import torch and numpy."""
  torch_python = str(torch_python or sys.executable)
  probe = subprocess.run([torch_python, "-c", "import torch, numpy"], capture_output=True, text=True, check=False)
  if probe.returncode != 0:
    raise RuntimeError(f"{torch_python} cannot import torch and numpy for the official side; for example: "
                       f"{_TORCH_HINT}\n{probe.stderr[-1000:]}")
  return torch_python


def _check_threads(threads: int) -> None:
  cpus = len(os.sched_getaffinity(0))
  if threads > cpus:
    raise ValueError(f"threads={threads} but this process may use only {cpus} CPUs; pass threads<={cpus}")


def _peak_rss_gib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB


def _time_steps(step, steps: int) -> dict:
  """Runs `step()` (returns the loss as a float) once to warm up, then `steps` times under the clock.

  Wall time is the headline number; process CPU time (all threads) is
  reported beside it because it moves much less than wall time when other
  programs share the cores.
  """
  start = time.perf_counter()
  first_loss = step()
  warmup = time.perf_counter() - start
  times, cpu_times, loss = [], [], first_loss
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return {"seconds_per_step": round(statistics.median(times), 4), "min_seconds_per_step": round(min(times), 4),
          "step_seconds": [round(t, 4) for t in times],
          "cpu_seconds_per_step": round(statistics.median(cpu_times), 4),
          "warmup_seconds": round(warmup, 3), "first_loss": round(first_loss, 4), "last_loss": round(loss, 4),
          "peak_rss_gib": _peak_rss_gib(), "python": platform.python_version()}


def _best_rate(run, flop: float, repeats: int = 5) -> float:
  """GFLOP/s of `run()` (blocks until done) from its fastest of `repeats` timed calls after a warm-up."""
  run()
  best = min(_timed(run) for _ in range(repeats))
  return round(flop / best / 1e9, 1)


def _timed(run) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def _size(size: str):
  """(layers, heads, dim) of a configs/base.py DECODER_SIZES entry."""
  from configs import base
  if size not in base.DECODER_SIZES:
    raise ValueError(f"unknown decoder size {size!r}; valid: {', '.join(base.DECODER_SIZES)}")
  return base.DECODER_SIZES[size][:3]


def measure_official(official_repo, layers: int, heads: int, dim: int, vocab: int, batch: int, tokens: int,
                     steps: int) -> dict:
  """Times the official EncDecPos training step in this process (needs torch).

  Args:
    official_repo: checkout of the official repository.
    layers, heads, dim: decoder size.
    vocab: token ids (the official code sets `padded_vocab_size` to it too).
    batch, tokens: examples per step and input tokens per example.
    steps: timed steps after the warm-up step.

  Returns:
    `_time_steps`' dict plus `params`, `torch` (version), `num_threads` and
    `matmul_gflops_per_s` (torch's rate on a 2048^3 float32 matmul).
  """
  import torch

  torch.manual_seed(0)
  enc_dec = _load_by_path(_official_file(official_repo, OFFICIAL_DECODER), "official_enc_dec")
  # As train_llama_mt_on_crnn.py builds it (block size one more than the input length).
  config = enc_dec.EncDecConfig(block_size=tokens + 1, vocab_size=vocab, padded_vocab_size=vocab, n_layer=layers,
                                n_head=heads, n_embd=dim, audio_n_embd=FEATURE_DIM)
  model = enc_dec.EncDecPos(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  features = torch.randn(batch, FRAMES, FEATURE_DIM)  # [batch, frames, 1536]
  sequence = torch.randint(1, vocab, (batch, tokens + 1))  # [batch, tokens + 1], no <pad> (id 0)
  # Separate tensors, as `.to(device)` makes them in the official loop: the model
  # multiplies targets by the mask in place, and ones keep their values.
  inputs, targets = sequence[:, :-1].clone(), sequence[:, 1:].clone()  # [batch, tokens] each
  mask = torch.ones_like(targets)

  def step():
    optimizer.zero_grad()
    _, loss = model(audio_emb=features, idx=inputs, target=targets, target_mask=mask)
    loss.backward()
    optimizer.step()
    return loss.item()

  report = _time_steps(step, steps)
  a, b = torch.randn(PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE), torch.randn(PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE)
  report.update(params=sum(p.numel() for p in model.parameters()), torch=torch.__version__,
                num_threads=torch.get_num_threads(),
                matmul_gflops_per_s=_best_rate(lambda: torch.mm(a, b), 2 * PEAK_MATMUL_SIZE**3))
  return report


def hiermt_config(size: str, tokens: int):
  """hiermt's onset-stage config at the official settings: cross-attention, float32, AdamW lr 1e-4, no clipping."""
  from configs import base

  config = base.get_config(f"onset_pitch,size={size},conditioning=cross")
  config.data.max_tokens = tokens
  config.freeze_encoder = False
  config.train.update(dtype="float32", lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, grad_clip=0.0,
                      warmup_steps=0, decay="constant")
  return config


def measure_hiermt(size: str, vocab: int, batch: int, tokens: int, steps: int) -> dict:
  """Times hiermt's decoder training step (jitted value_and_grad + optax AdamW update) in this process.

  The decoder comes from `transcriber.build_decoder(hiermt_config(...))` with
  the vocabulary swapped for `vocab`, the loss is `objectives.token_loss` and the
  optimiser `train.make_optimizer`, i.e. the pieces hiermt trains with.

  Returns:
    `_time_steps`' dict (its warm-up includes compilation) plus `params`,
    `remat`, `step_gflop` (matmul work of forward + backward, from the
    jaxpr), `matmul_gflops_per_s` (XLA's rate on a 2048^3 float32 matmul) and
    the `jax`, `jaxlib` and `flax` versions.
  """
  import flax
  import jax
  import jax.numpy as jnp
  import optax
  from hiermt import flops
  from hiermt import objectives
  from hiermt import train
  from hiermt.models import decoder as decoder_lib
  from hiermt.models import transcriber

  config = hiermt_config(size, tokens)
  decoder = transcriber.build_decoder(config).clone(vocab_size=vocab)
  k_features, k_tokens, k_init = jax.random.split(jax.random.key(0), 3)
  features = jax.random.normal(k_features, (batch, FRAMES, FEATURE_DIM))  # [batch, frames, 1536]
  token_ids = jax.random.randint(k_tokens, (batch, tokens), 1, vocab)  # [batch, tokens], no <pad>
  loss_mask = jnp.ones(token_ids.shape, jnp.float32)
  params = jax.jit(decoder.init)(k_init, token_ids, features)["params"]
  tx = train.make_optimizer(config)

  def loss_fn(p, tokens, features, loss_mask):
    logits = decoder.apply({"params": p}, tokens, features)  # [batch, tokens, vocab]
    return objectives.token_loss(logits, {"tokens": tokens, "loss_mask": loss_mask})[0]

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, tokens, features, loss_mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, features, loss_mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = {"params": params, "opt_state": tx.init(params)}

  def step():
    state["params"], state["opt_state"], loss = update(state["params"], state["opt_state"], token_ids, features,
                                                       loss_mask)
    jax.block_until_ready(state)
    return float(loss)

  report = _time_steps(step, steps)
  gradient = jax.make_jaxpr(jax.value_and_grad(loss_fn))(state["params"], token_ids, features, loss_mask)
  a = jax.random.normal(k_init, (PEAK_MATMUL_SIZE, PEAK_MATMUL_SIZE))
  matmul = jax.jit(lambda a: a @ a)
  report.update(params=decoder_lib.count_params(state["params"], exclude=()), remat=decoder.remat,
                step_gflop=round(flops.matmul_flops(gradient.jaxpr) / 1e9, 3),
                matmul_gflops_per_s=_best_rate(lambda: matmul(a).block_until_ready(), 2 * PEAK_MATMUL_SIZE**3),
                jax=jax.__version__, jaxlib=jax.lib.__version__, flax=flax.__version__)
  return report


def _run_side(python, side: str, spec: dict) -> dict:
  """Runs one side's measurement in a fresh `python` process and returns its report."""
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "report.json"
    command = [python, str(pathlib.Path(__file__).resolve()), side, json.dumps(spec), str(out)]
    done = subprocess.run(command, cwd=_REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"the {side} side failed (exit {done.returncode}) running {' '.join(command)}:\n"
                         f"{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def compare(official_repo, size: str = "tiny", batch: int = 5, tokens: int = 1024, steps: int = 3,
            torch_python=None, threads: int = 2) -> dict:
  """Seconds per training step of the official decoder and hiermt's, at equal configuration.

  Args:
    official_repo: path to a checkout of the official repository.
    size: configs/base.py DECODER_SIZES name (paper: tiny 4/8/512, base 6/16/1024).
    batch: examples per step (official: 5).
    tokens: input tokens per example (official onset stage: 1024).
    steps: timed steps per side, after one warm-up step.
    torch_python: Python interpreter with torch and numpy for the official side;
      None uses this interpreter.
    threads: CPUs each side is pinned to (torch.set_num_threads on the
      official side; XLA sizes its thread pool from the CPUs it may use).

  Returns:
    JSON-ready dict: `official` and `hiermt` reports (seconds_per_step,
    min_seconds_per_step, step_seconds, cpu_seconds_per_step, warmup_seconds,
    peak_rss_gib, losses, params, versions); `speedup` (official / hiermt
    median seconds per step), `speedup_min` (from the fastest steps) and
    `speedup_cpu` (from CPU seconds, the least disturbed by other programs);
    `params_match`; the shared settings; the 1-minute load average before
    and after; `speedup_ceiling`, the speed-up a step doing hiermt's matmul
    work entirely at the faster framework's measured matmul rate
    (`matmul_gflops_per_s`, a 2048^3 float32 matmul) would reach: no
    implementation of this step on these CPUs gets past it.
  """
  if min(batch, tokens, steps, threads) < 1:
    raise ValueError(f"batch, tokens, steps and threads must be >= 1, got {batch}, {tokens}, {steps}, {threads}")
  _check_threads(threads)
  _official_file(official_repo, OFFICIAL_DECODER)
  layers, heads, dim = _size(size)
  torch_python = _torch_python(torch_python)
  vocab = official_vocab_size(official_repo)
  spec = {"official_repo": str(pathlib.Path(official_repo).expanduser().resolve()), "size": size, "layers": layers,
          "heads": heads, "dim": dim, "vocab": vocab, "batch": batch, "tokens": tokens, "steps": steps,
          "threads": threads}
  load_before = os.getloadavg()[0]
  official = _run_side(torch_python, "official", spec)
  ours = _run_side(sys.executable, "hiermt", spec)
  # Rates at hiermt's matmul count (the official code's is no smaller: it also
  # computes the masked half of causal attention).
  for report in (official, ours):
    report["gflops_per_s"] = round(ours["step_gflop"] / report["seconds_per_step"], 1)
  peak = max(official["matmul_gflops_per_s"], ours["matmul_gflops_per_s"])
  return {
      "settings": dict(spec, frames=FRAMES, feature_dim=FEATURE_DIM, dtype="float32",
                       optimizer=f"AdamW lr={LEARNING_RATE} weight_decay={WEIGHT_DECAY}, no clipping",
                       machine_cpus=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", "")),
      "official": official,
      "hiermt": ours,
      "speedup": round(official["seconds_per_step"] / ours["seconds_per_step"], 3),
      "speedup_min": round(official["min_seconds_per_step"] / ours["min_seconds_per_step"], 3),
      "speedup_cpu": round(official["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"], 3),
      "speedup_ceiling": round(peak / official["gflops_per_s"], 3),
      "params_match": official["params"] == ours["params"],
      "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
  }


def measure_official_decode(official_repo, layers: int, heads: int, dim: int, encoder: str, frames: int,
                            feature_dim: int, onsets: list, pitches: list, stages: list) -> dict:
  """Times the official generation loop of each stage on one call's worth of work, in this process (needs torch).

  Args:
    official_repo: checkout of the official repository.
    layers, heads, dim: decoder size (EncDecPos, cross-attention).
    encoder: "crnn" or "hppnet", which picks the scripts' `max_token_len`.
    frames, feature_dim: encoder features of one 10 s segment (random here).
    onsets, pitches: the notes of one segment (10 ms steps, MIDI pitches): the
      forced stages' `time pitch` tokens, and their count sets the free
      stages' lengths (2 or 4 tokens per note).
    stages: the stages to time.

  Returns:
    {stage: {seconds, segments_per_call, forward_passes, tokens_written,
    batch, block_size}} plus `vocab`, `params`, `torch`, `num_threads`.
    One call is one `generate_in_batch` over 15 segments for onset_pitch and
    one segment for the others; each stage's model first runs one warm-up
    forward pass (the scripts build their RoPE and mask caches once per
    model), which is not timed.
  """
  import numpy as np
  import torch

  torch.manual_seed(0)
  enc_dec = _load_by_path(_official_file(official_repo, OFFICIAL_DECODER), "official_enc_dec")
  tokenizers = _load_by_path(_official_file(official_repo, OFFICIAL_TOKENIZER), "official_tokenizers")
  tokenizer = tokenizers.Tokenizer()
  vocab = int(tokenizer.vocab_size)
  notes = len(onsets)
  report = {"vocab": vocab, "torch": torch.__version__, "num_threads": torch.get_num_threads(), "params": {}}
  for stage in stages:
    max_tokens = MAX_TOKENS[encoder][stage]
    config = enc_dec.EncDecConfig(block_size=max_tokens + 1, vocab_size=vocab, padded_vocab_size=vocab,
                                  n_layer=layers, n_head=heads, n_embd=dim, audio_n_embd=feature_dim)
    model = enc_dec.EncDecPos(config).eval()
    report["params"][stage] = sum(p.numel() for p in model.parameters())
    prompt = tokenizer.strings_to_tokens(["<sos>", TASKS[stage]])
    batch = ONSET_BATCH if stage == "onset_pitch" else 1
    audio_emb = torch.randn(batch, frames, feature_dim)  # [batch, frames, feature_dim]
    idx = torch.LongTensor(np.repeat(np.array(prompt)[None, :], batch, axis=0))  # [batch, 2]
    with torch.no_grad():
      model(audio_emb, idx)  # warm-up
    length = len(prompt) + TOKENS_PER_NOTE[stage] * notes  # the longest sequence written
    if length > max_tokens + 1:
      raise ValueError(f"{notes} notes make {length} {stage} tokens; the official block holds {max_tokens + 1}")
    if stage in FREE_STAGES:
      new_tokens = TOKENS_PER_NOTE[stage] * notes
      start = time.perf_counter()
      with torch.no_grad():
        out = model.generate_in_batch(audio_emb=audio_emb, idx=idx, max_new_tokens=new_tokens, end_token=-1)
      seconds = time.perf_counter() - start
      written, passes = out.shape[1] - 1, new_tokens
    else:
      eos = tokenizer.stoi("<eos>")
      tokens = list(prompt)
      start = time.perf_counter()
      for onset, pitch in zip(onsets, pitches):
        tokens += [tokenizer.stoi("time={:.2f}".format(onset / 100)), tokenizer.stoi(f"pitch={pitch}")]
        with torch.no_grad():
          model.eval()
          pred = model.generate_in_batch(audio_emb=audio_emb, idx=torch.LongTensor(np.array(tokens)[None, :]),
                                         max_new_tokens=1, end_token=eos).data.cpu().numpy()
        tokens = tokens + [int(pred[0][-1])]
      seconds = time.perf_counter() - start
      written, passes = notes, notes
    report[stage] = {"seconds": round(seconds, 3), "segments_per_call": batch, "batch": batch,
                     "forward_passes": passes, "tokens_written_per_segment": written,
                     "block_size": max_tokens + 1}
  report["peak_rss_gib"] = _peak_rss_gib()
  return report


def decode_official(official_repo, size: str, encoder: str, frames: int, feature_dim: int, onsets, pitches,
                    stages, torch_python=None, threads: int = 2) -> dict:
  """The official generation loops timed in a fresh `torch_python` process pinned to `threads` CPUs.

  Args:
    official_repo: path to a checkout of the official repository.
    size: configs/base.py DECODER_SIZES name.
    encoder, frames, feature_dim: whose features condition the decoder (random values).
    onsets, pitches: one segment's notes (ints: 10 ms steps, MIDI pitches).
    stages: stages to time.
    torch_python: Python with torch and numpy (None: this interpreter).
    threads: CPUs the process is pinned to (and torch's thread count).

  Returns:
    `measure_official_decode`'s report plus the 1-minute load average before and after.
  """
  _check_threads(threads)
  _official_file(official_repo, OFFICIAL_DECODER)
  layers, heads, dim = _size(size)
  spec = {"official_repo": str(pathlib.Path(official_repo).expanduser().resolve()), "layers": layers,
          "heads": heads, "dim": dim, "encoder": encoder, "frames": frames, "feature_dim": feature_dim,
          "onsets": [int(t) for t in onsets], "pitches": [int(p) for p in pitches], "stages": list(stages),
          "threads": threads}
  load_before = os.getloadavg()[0]
  report = _run_side(_torch_python(torch_python), "official_decode", spec)
  report["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
  report["threads"] = threads
  return report


def _worker(side: str, spec: dict) -> dict:
  """One side's measurement, pinned to `spec['threads']` CPUs before any framework starts its thread pools."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:spec["threads"]])
  if side == "official":
    import torch

    torch.set_num_threads(spec["threads"])
    return measure_official(spec["official_repo"], spec["layers"], spec["heads"], spec["dim"], spec["vocab"],
                            spec["batch"], spec["tokens"], spec["steps"])
  if side == "official_decode":
    import torch

    torch.set_num_threads(spec["threads"])
    return measure_official_decode(spec["official_repo"], spec["layers"], spec["heads"], spec["dim"],
                                   spec["encoder"], spec["frames"], spec["feature_dim"], spec["onsets"],
                                   spec["pitches"], spec["stages"])
  sys.path.insert(0, str(_REPO_ROOT))  # hiermt and configs/ from this checkout
  return measure_hiermt(spec["size"], spec["vocab"], spec["batch"], spec["tokens"], spec["steps"])


if __name__ == "__main__":
  # Run as a script: drop the hiermt/benchmark/ folder Python put first on
  # sys.path, so its modules (train, decode, ...) cannot shadow anything torch imports.
  if sys.path and pathlib.Path(sys.path[0]).resolve() == pathlib.Path(__file__).resolve().parent:
    del sys.path[0]
  if len(sys.argv) != 4 or sys.argv[1] not in SIDES:
    sys.exit(f"usage: python {__file__} {{{'|'.join(SIDES)}}} SPEC_JSON OUT_JSON "
             "(internal worker; call compare or decode_official instead)")
  report = _worker(sys.argv[1], json.loads(sys.argv[2]))
  pathlib.Path(sys.argv[3]).write_text(json.dumps(report))
