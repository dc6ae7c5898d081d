"""Entry point of `python -m hiermt.benchmark` (modes: see the package docstring)."""

if __name__ == "__main__":
  # First, so the heavy imports below happen only in the process that stays.
  from hiermt import allocator
  allocator.use_tcmalloc()

  from absl import app

  from hiermt.benchmark import cli

  app.run(cli.main)
