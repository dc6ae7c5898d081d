"""configs/base.py: stage parsing, sizes, runlocal, clear errors on typos."""
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
