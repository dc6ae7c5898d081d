"""configs/base.py: stage parsing, sizes, runlocal, clear errors on typos."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import load_base_config

base = load_base_config()


@pytest.mark.parametrize("stage", base.STAGES)
def test_every_stage_builds(stage):
  c = base.get_config(stage)
  assert c.stage == stage
  assert c.decoder.size == "base" and (c.decoder.num_layers, c.decoder.num_heads, c.decoder.dim) == (6, 16, 1024)
  assert c.train.batch_size == (12 if stage == "encoder" else 40)
  assert c.data.max_tokens == base.MAX_TOKENS.get(stage, 0)


def test_options_and_paper_defaults():
  c = base.get_config("velocity,encoder=hppnet,size=large,conditioning=cross")
  assert (c.encoder.name, c.decoder.conditioning) == ("hppnet", "cross")
  assert (c.decoder.num_layers, c.decoder.num_heads, c.decoder.dim, c.train.batch_size) == (12, 32, 1024, 24)
  assert c.train.lr == 1e-4 and c.train.weight_decay == 0.01 and c.train.decay == "constant"


def test_runlocal_is_small_but_keeps_explicit_size():
  c = base.get_config("onset_pitch,runlocal")
  assert c.decoder.size == "nano" and c.train.steps < 20 and c.data.worker_count == 0
  assert base.get_config("onset_pitch,runlocal,size=tiny").decoder.size == "tiny"


@pytest.mark.parametrize("arg,needle", [
    ("veloctiy", "valid choices: encoder, onset_pitch"),
    ("velocity,encoder=resnet", "crnn, hppnet"),
    ("velocity,size=huge", "tiny"),
    ("velocity,conditioning=film", "prefix, cross"),
    ("velocity,sizee=tiny", "unknown config option 'sizee'"),
    ("", "needs a stage"),
])
def test_typos_fail_with_the_valid_choices(arg, needle):
  with pytest.raises(ValueError, match=needle):
    base.get_config(arg)


def test_cli_names_a_misspelt_stage_or_option_in_one_line(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, HIERMT_TCMALLOC="0")
  for arg, needle in (("veloctiy", "unknown stage 'veloctiy'; valid choices: encoder, onset_pitch"),
                      ("velocity,sise=tiny", "unknown config option 'sise'")):
    proc = subprocess.run([sys.executable, "-m", "hiermt.main", f"--config=configs/base.py:{arg}",
                           f"--workdir={tmp_path}"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_names_an_option_the_encoder_cannot_serve_in_one_line(tmp_path):
  # The note reader reads per-key features, which the CRNN (the default encoder) does not have.
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "hiermt.main", "--config=configs/base.py:offset,runlocal",
                         f"--workdir={tmp_path}", "--config.decoder.note_reader=16"],
                        cwd=root, env=dict(os.environ, HIERMT_TCMALLOC="0"), capture_output=True, text=True,
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"[IW]\d{4} ", line)]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith("hiermt.main: config.decoder.note_reader reads the encoder's rolls key by key")
  assert errors[0].endswith("set it to 0 for encoder 'crnn'")


def test_cli_names_the_untrained_encoder_in_one_line(tmp_path):
  # An LM stage in a workdir without an encoder checkpoint: the error says what to train first.
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, HIERMT_TCMALLOC="0")
  proc = subprocess.run([sys.executable, "-m", "hiermt.main", "--config=configs/base.py:onset_pitch,runlocal",
                         f"--workdir={tmp_path}", f"--config.data.data_dir={tmp_path / 'corpus'}"],
                        cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  # Everything but absl's log lines (I/W + date) and blank ones.
  errors = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"[IW]\d{4} ", line)]
  assert errors == [f"hiermt.main: no checkpoint in {tmp_path / 'encoder'}. Pretrain the encoder first "
                    "(python -m hiermt.main --config=configs/base.py:encoder --workdir=WORKDIR), point "
                    "--config.init_from at a stage directory that has one, or set --config.init_from=none "
                    "to start the encoder from scratch"], proc.stderr[-2000:]


def test_only_hiermts_own_missing_file_errors_become_one_line(monkeypatch, capsys):
  from hiermt import main as main_lib
  from hiermt import train

  def fail_with(error):
    def run(config, workdir):
      raise error
    monkeypatch.setattr(train, "run", run)

  fail_with(FileNotFoundError("no checkpoint in /w/encoder. Pretrain the encoder first"))
  with pytest.raises(SystemExit) as exit_info:
    main_lib._train(None, "/w")
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "hiermt.main: no checkpoint in /w/encoder. Pretrain the encoder first\n"
  # A file vanishing mid-run (the system's error, naming the file) keeps its traceback.
  fail_with(FileNotFoundError(2, "No such file or directory", "/w/onset_pitch/metrics.jsonl"))
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    main_lib._train(None, "/w")
