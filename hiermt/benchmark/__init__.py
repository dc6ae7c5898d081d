"""Measurements of hiermt, printed as JSON: `python -m hiermt.benchmark --what=MODE`.

  --what=params
      Parameter counts of both encoders and every decoder size (the decoder's
      audio projection excluded), and forward FLOPs per 10 s segment (params.py).
  --what=train_step [--sizes=nano,micro,tiny] [--encoder=crnn]
      Forward + backward wall time per example of the decoder (train.py).
  --what=loader [--stages=...] [--data_dir=DIR]
      Examples/s of the Grain pipeline from one worker (in-process), per stage (loader.py).
  --what=train [--stages=...] [--config_arg=runlocal] [--steps=4 --rounds=5]
      Whole train steps fed by the real loader and by one in-memory batch, in
      alternating rounds (train.py).
  --what=accumulation [--stages=...] [--accums=1,2,4] [--config_arg=runlocal] [--steps=2 --rounds=5]
      Step time at train.grad_accum = k against k x one micro-batch's step, on
      fixed batches, in alternating rounds (train.py). Run with forced CPU
      devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) to check that
      micro-batches stay split over all devices.
  --what=vs_official --official_repo=DIR [--torch_python=PY] [--sizes=tiny,base]
      The official PyTorch decoder training step and ours at equal
      configuration, one after the other (official.py).
  --what=decode [--sizes=tiny] [--conditioning=prefix,cross] [--piece_seconds=60] [--notes_per_second=20]
      Decoding time of a dense piece per stage: hiermt's cached, batched loops
      against the official strategy, in JAX and (with --official_repo) in the
      official PyTorch code (decode.py).
  --what=transcribe [--layouts=hierarchy,flatten,roll] [--encoder=crnn] [--audio_seconds=60]
      Whole-file transcription time and real-time factor with random-weight
      stages, and the encoders' forward alone (transcription.py).

The package is light to import: `__main__` re-runs the command under tcmalloc
before anything heavy loads, and `cli` holds the flags and the dispatch.
"""
