"""The quickstart: budgeted stage runs, resumption, its commands and its results table."""
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from hiermt import quickstart


def test_stage_command_is_an_ordinary_training_command():
  cmd = quickstart.stage_command("py", "velocity", "hppnet", quickstart.PRESETS["cpu"], "/w", "/c")
  assert cmd[:5] == ["py", "-m", "hiermt.main", "--config=configs/base.py:velocity,encoder=hppnet,size=micro",
                     "--workdir=/w"]
  flags = dict(f.removeprefix("--config.").split("=", 1) for f in cmd[5:])
  assert flags["encoder.width"] == "0.25" and flags["data.data_dir"] == "/c" and flags["freeze_encoder"] == "True"
  # LM stages are validated on 6 pieces of up to 90 s; the encoder keeps its own 3 x 20 s
  assert flags["train.eval_pieces"] == "6" and flags["train.eval_seconds"] == "90.0"
  # every stage, the encoder too, is validated and used with its parameters' moving average
  assert flags["train.ema_decay"] == "0.99"
  # HPPNet's features are per key: the note reader with its onset prior (onset_pitch reads it), and
  # the unsure-pitch threshold chosen with it
  assert flags["decoder.note_reader"] == "16" and flags["decode.min_pitch_prob"] == "0.3"
  assert flags["decoder.onset_prior"] == "True"
  crnn = quickstart.stage_command("py", "onset_pitch", "crnn", quickstart.PRESETS["cpu"], "/w", "/c")
  crnn_flags = dict(f.removeprefix("--config.").split("=", 1) for f in crnn[5:])
  # the per-stage override wins over the preset-wide one
  assert crnn_flags["encoder.width"] == "0.125" and crnn_flags["data.max_tokens"] == "512"
  assert "--config.data.segment_seconds=4.0" not in crnn and "decoder.note_reader" not in crnn_flags
  assert "decoder.onset_prior" not in crnn_flags
  assert crnn_flags["decode.min_pitch_prob"] == "0.7"
  encoder = quickstart.stage_command("py", "encoder", "crnn", quickstart.PRESETS["cpu"], "/w", "/c")
  assert "--config.data.segment_seconds=4.0" in encoder and "--config.train.warmup_steps=0" in encoder
  assert "--config.train.eval_pieces=3" in encoder and "--config.train.eval_seconds=20.0" in encoder
  assert "--config.train.ema_decay=0.99" in encoder
  gpu = quickstart.stage_command("py", "onset_pitch", "hppnet", quickstart.PRESETS["gpu"], "/w", "/c")
  gpu_flags = dict(f.removeprefix("--config.").split("=", 1) for f in gpu[5:])
  # published width: the config's own encoder.width (1.0) stands
  assert "encoder.width" not in gpu_flags and gpu_flags["train.batch_size"] == "32"
  gpu_encoder = quickstart.stage_command("py", "encoder", "hppnet", quickstart.PRESETS["gpu"], "/w", "/c")
  assert "--config.train.batch_size=12" in gpu_encoder
  for preset in quickstart.PRESETS.values():
    assert abs(sum(preset.shares.values()) - 1.0) < 1e-9


def test_budget_stops_a_stage_with_sigterm(tmp_path):
  # A stand-in trainer: saves (writes a file) and exits 75 on SIGTERM, like hiermt.main.
  script = tmp_path / "trainer.py"
  script.write_text(textwrap.dedent("""
      import signal, sys, time
      def stop(*_):
        open(sys.argv[1], "w").write("saved")
        sys.exit(75)
      signal.signal(signal.SIGTERM, stop)
      print("ready", flush=True)
      time.sleep(60)
  """))
  started = time.time()
  status, stopped = quickstart.run_with_budget([sys.executable, str(script), str(tmp_path / "ckpt")], 2.0)
  assert (status, stopped) == (75, True) and time.time() - started < 30
  assert (tmp_path / "ckpt").read_text() == "saved"
  assert quickstart.run_with_budget([sys.executable, "-c", "pass"], 30.0) == (0, False)
  # No budget (a stage with fixed steps): it runs to its end, however long.
  slow = [sys.executable, "-c", "import time; time.sleep(1.5)"]
  assert quickstart.run_with_budget(slow, None) == (0, False)


def test_fixed_steps_from_the_flag_or_a_runs_steps_line():
  assert quickstart.parse_steps("") == {}
  assert quickstart.parse_steps("encoder=4081, velocity=2") == {"encoder": 4081, "velocity": 2}
  line = "steps trained (checkpoint used): encoder 4081 (uses 3300), onset_pitch 831 (uses 200)"
  assert quickstart.parse_steps(line) == {"encoder": 4081, "onset_pitch": 831}
  for bad, message in [("encodr=3", "unknown stage 'encodr'"), ("velocity=0", "positive whole number"),
                       ("velocity=2.5", "positive whole number"), ("offset=3,offset=4", "given twice")]:
    with pytest.raises(ValueError, match=message):
      quickstart.parse_steps(bad)
  cmd = quickstart.stage_command("py", "velocity", "hppnet", quickstart.PRESETS["cpu"], "/w", "/c", steps=271)
  flags = dict(f.removeprefix("--config.").split("=", 1) for f in cmd[5:])
  assert flags["train.steps"] == "271"  # the preset's 1_000_000 (train until the budget stops it) replaced


def test_results_table_rows_and_columns():
  def report(on, onoff, vel):
    return {"mean": {"onset_f1": on, "onset_offset_f1": onoff, "onset_offset_velocity_f1": vel}}
  seen = {"roll": report(0.9, 0.8, 0.7), "hierarchy": report(0.95, 0.85, 0.75)}
  heldout = {"roll": report(0.5, 0.4, 0.3)}
  table = quickstart.results_table("crnn", {"roll": 1_500_000, "hierarchy": 2_250_000}, seen, heldout)
  lines = table.splitlines()
  assert len(lines) == 4 and "held-out On" in lines[0]
  assert lines[2].split()[:10] == ["crnn", "Roll", "1.50", "M", "0.900", "0.800", "0.700", "0.500", "0.400", "0.300"]
  assert lines[3].split()[:10] == ["crnn", "Hierarchy", "2.25", "M", "0.950", "0.850", "0.750", "-", "-", "-"]
  assert "0.971 / 0.852 / 0.832 (HPPNet)" in lines[3]


def test_smoke_quickstart_end_to_end_and_resume(tmp_path):
  """The chain CI runs: corpus, five stages, evaluation of both corpora, the table; a re-run resumes."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
             HIERMT_TCMALLOC="0")
  cmd = [sys.executable, "-m", "hiermt.quickstart", "--preset=smoke", f"--workdir={tmp_path}", "--minutes=30",
         "--corpus_minutes=2.5", "--steps=velocity=2"]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  table, steps = (tmp_path / "results.txt").read_text().strip().split("\n\n")
  table = table.splitlines()
  assert [row.split()[1] for row in table[2:]] == ["Roll", "Flatten", "Hierarchy"]
  # The steps each stage trained and the checkpoint it is used at: a budget's outcome depends on them.
  trained = re.findall(r"(\w+) (\d+) \(uses (\d+)\)", steps)
  assert [stage for stage, _, _ in trained] == list(quickstart.STAGES), steps
  assert all(0 < int(used) <= int(latest) for _, latest, used in trained), steps
  assert ("velocity", "2", "2") in trained, steps  # --steps: exactly 2 steps (runlocal trains 4)
  for row in table[2:]:
    scores = [float(x) for x in row.split()[4:10]]  # seen and held-out On / On-Off / On-Off-Vel
    assert all(0.0 <= s <= 1.0 for s in scores)
  assert "hiermt.transcribe --workdir=" in first.stdout
  for stage in quickstart.STAGES:
    assert (tmp_path / stage / "quickstart.done").exists()
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("already trained") == 5
  commands = [line for line in second.stdout.splitlines() if line.startswith("$ ")]
  assert len(commands) == 1 and "hiermt.data.synth" in commands[0]  # only the (up-to-date) corpus check
  assert "--minutes=2.5" in commands[0]  # --corpus_minutes, not the preset's 3


def test_stage_budgets_absorb_overruns():
  shares = {"encoder": 0.5, "onset_pitch": 0.2, "velocity": 0.075, "offset": 0.075, "flatten": 0.15}
  tail = quickstart.STAGE_TAIL_SECONDS
  # 1000 s left: each of the five stages' tails kept back, the encoder gets half of the rest.
  assert quickstart.stage_seconds(shares, "encoder", 1000.0) == pytest.approx((1000.0 - 5 * tail) * 0.5)
  # The encoder overran by 20 s beyond its tail: 480 s are left for the rest, split 0.2 : 0.075 : 0.075 : 0.15.
  assert quickstart.stage_seconds(shares, "onset_pitch", 480.0) == pytest.approx((480.0 - 4 * tail) * 0.4)
  assert quickstart.stage_seconds(shares, "flatten", 170.0) == pytest.approx(170.0 - tail)  # the last: what is left
  # Too little left: every stage still gets its minimum.
  assert quickstart.stage_seconds(shares, "velocity", 100.0) == quickstart.MIN_STAGE_SECONDS
  assert quickstart.stage_seconds(shares, "flatten", -5.0) == quickstart.MIN_STAGE_SECONDS


def test_the_closing_commands_put_the_layout_that_scored_best_first():
  """A newcomer runs the first command shown: after a short budget that is Roll, not the untrained LMs."""
  seen = {"roll": {"mean": {"onset_f1": 0.764}}, "flatten": {"mean": {"onset_f1": 0.025}},
          "hierarchy": {"mean": {"onset_f1": 0.002}}}
  commands = quickstart.transcribe_commands("runs/q", seen)
  assert [c.split("--layout=")[1].split()[0] for c in commands] == ["roll", "flatten", "hierarchy"]
  assert commands[0] == ("  .venv/bin/python -m hiermt.transcribe --workdir=runs/q --layout=roll "
                         "--output_dir=out_roll my_recording.wav   # test On F1 0.764")
  # Without scores (evaluation missing): every layout, in transcribe's order, none annotated.
  assert [c.split("--layout=")[1].split()[0] for c in quickstart.transcribe_commands("w", {})] == [
      "hierarchy", "flatten", "roll"]
