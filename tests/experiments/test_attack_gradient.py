"""experiments/attack_gradient.py: tiny run writes the table and the figure; clear errors."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from asymml_jax.evaluation import gradient_attack as ga
from asymml_jax.models import get_model
from tests.helpers.experiments import import_experiment
from tests.helpers.tiny_model import tiny_staged_model

attack = import_experiment("experiments.attack_gradient")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = attack.AttackSettings(
    num_victim=2, num_attacker=40, batch_sizes=(1,), pretrain_steps=0, width=0.125,
    attack=ga.GradientAttackConfig(steps=2))


def test_tiny_run_writes_json_and_png(tmp_path):
  lines: list[str] = []
  channels = ("weight_gradient", "residuals")
  # A two-conv network on the 32x32 digits compiles in a fraction of VGG11's time.
  table = attack.run_attack(
      configs=("dense",), channels=channels, workdir=str(tmp_path), settings=TINY,
      log=lines.append, make_model=lambda shape, n, width: tiny_staged_model(
          input_shape=shape, channels=(4, 8), num_classes=n))
  written = json.loads((tmp_path / "attack_gradient.json").read_text())
  assert written == json.loads(json.dumps(table))
  assert written["split"] == {"num_attacker": 40, "num_victim": 2, "disjoint": True}
  assert written["labels"] == "known" and written["model"] == "tiny"
  assert [(r["name"], r["channel"], r["batch_size"]) for r in written["rows"]] == [
      ("dense", "weight_gradient", 1), ("dense", "residuals", 1)]
  for r in written["rows"]:
    assert -1.0 <= r["ssim"] <= 1.0 and r["psnr"] > 0 and r["n"] == 2
    assert len(r["distance_curve"]) == 2 and r["label_recovery_accuracy"] == 1.0
    assert r["noise_multiplier"] == 0.0 and math.isinf(r["epsilon"])
  assert {"prior_mean", "prior_blank"} == set(written["baselines"])
  assert set(written["checks"]) == {"dense/weight_gradient/b1_ssim_above_prior_floor",
                                    "dense/residuals/b1_ssim_above_prior_floor"}
  png = (tmp_path / "attack_gradient.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  assert any(l.startswith("configuration") for l in lines)  # the final table
  assert not math.isnan(written["wall_seconds"])


def test_dp_configuration_is_calibrated_as_training():
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 1), width=0.125,
                    norm="group")
  exposure, expected, fields = attack.make_exposure("asymml_dp_eps8", model, TINY, 4500)
  assert exposure.privacy.enabled and exposure.privacy.noise_multiplier > 0
  assert fields["clip"] == 0.01 and fields["grad_clip"] == 1e-5
  assert 8.0 - 1e-3 <= fields["epsilon"] <= 8.0 and fields["dp_steps"] == 210
  assert expected == 64.0  # the loss divides by the expected batch, as DP training does
  exposure, expected, fields = attack.make_exposure("asymml_r2", model, TINY, 4500)
  assert exposure.decomposition.max_rank == 2 and expected is None and fields["rank"] == 2


@pytest.mark.parametrize("text,want", [
    ("dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8",
     ("dense", "asymml_r1", "asymml_r2", "asymml_r4", "asymml_dp_eps8")),
    (" Dense , asymml_dp_eps0.5 ", ("dense", "asymml_dp_eps0.5")),
])
def test_parse_configs(text, want):
  assert attack.parse_configs(text) == want


@pytest.mark.parametrize("fn,text,match", [
    ("parse_configs", "", "at least one"), ("parse_configs", "gpu", "unknown configuration"),
    ("parse_configs", "dense,dense", "twice"), ("parse_channels", "loss", "unknown channel"),
    ("parse_channels", "both,both", "twice"), ("parse_channels", " ", "at least one"),
    ("parse_batch_sizes", "0", "int >= 1"), ("parse_batch_sizes", "1,1", "twice"),
    ("parse_batch_sizes", "x", "int >= 1"),
])
def test_parse_refusals(fn, text, match):
  with pytest.raises(ValueError, match=match):
    getattr(attack, fn)(text)


def test_parse_channels_and_batch_sizes():
  assert attack.parse_channels("both, weight_gradient") == ("both", "weight_gradient")
  assert attack.parse_batch_sizes("1,4") == (1, 4)


def test_settings_validation():
  with pytest.raises(ValueError, match="num_victim"):
    attack.AttackSettings(num_victim=0)
  with pytest.raises(ValueError, match="width"):
    attack.AttackSettings(width=0.0)
  with pytest.raises(ValueError, match="batch_sizes"):
    attack.AttackSettings(batch_sizes=())
  with pytest.raises(ValueError, match="exceeds num_victim"):
    attack.AttackSettings(num_victim=2, batch_sizes=(4,))
  with pytest.raises(ValueError, match="attack"):
    attack.AttackSettings(attack={"steps": 3})


@pytest.mark.slow
def test_cli_bad_channel_is_a_clear_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.attack_gradient", "--channels=loss",
                      f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env, text=True,
                     capture_output=True, timeout=120)
  assert p.returncode != 0
  assert "unknown channel 'loss'" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "w").exists()
