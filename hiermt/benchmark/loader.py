"""`--what=loader`: examples/s of the Grain input pipeline from one worker, per stage."""

import time

from configs import base
from hiermt.data import pipeline


def stage_config(stage, options, data_dir):
  """The config of `stage` with `options` appended, reading `data_dir` (empty: the small generated corpus)."""
  config = base.get_config(f"{stage},{options}" if options else stage)
  config.data.data_dir = data_dir
  if not data_dir:  # the small generated corpus; loader speed does not depend on corpus size
    config.data.generated_minutes = base.get_config(f"{stage},runlocal").data.generated_minutes
  return config


def loader_report(stages, batches, batch, data_dir="") -> dict:
  """Examples/s of the input pipeline (in-process, i.e. one worker), per stage, at paper token lengths."""
  report = {"batch": batch, "timed_batches": batches, "examples_per_s": {}, "max_tokens": {}}
  for stage in stages:
    config = stage_config(stage, "", data_dir)
    config.data.worker_count = 0
    config.train.batch_size = batch
    it = iter(pipeline.make_dataset(config, config.data.train_split, seed=0))
    next(it)  # opens memory maps, caches notes
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    report["examples_per_s"][stage] = round(batches * batch / (time.perf_counter() - start), 1)
    report["max_tokens"][stage] = config.data.max_tokens
  return report
