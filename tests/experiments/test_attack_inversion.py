"""experiments/attack_inversion.py: tiny run writes the table and the figure; clear errors."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from asymml_jax.evaluation import inversion
from tests.helpers.experiments import import_experiment

attack = import_experiment("experiments.attack_inversion")

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = attack.AttackSettings(
    num_attacker=48, num_victim=16, pretrain_steps=0, width=0.125, release_batch=16,
    num_examples=3, decoder=inversion.DecoderConfig(features=4, epochs=1, batch_size=16))


def test_tiny_run_writes_json_and_png(tmp_path):
  configs = ("dense", "asymml_r2", "asymml_dp_eps8")
  lines: list[str] = []
  table = attack.run_attack(configs=configs, workdir=str(tmp_path), settings=TINY,
                            log=lines.append)
  written = json.loads((tmp_path / "attack_inversion.json").read_text())
  assert written == json.loads(json.dumps(table))
  assert written["site"] == "s1" and written["site_shape"] == [16, 16, 8]
  assert written["split"] == {"num_attacker": 48, "num_victim": 16, "disjoint": True}
  assert [r["name"] for r in written["rows"]] == list(configs)
  for r in written["rows"]:
    assert -1.0 <= r["ssim"] <= 1.0 and r["psnr"] > 0 and r["n"] == 16
    assert r["exposure_shape"] == [16, 16, 8] and len(r["decoder_losses"]) == 1
  rows = {r["name"]: r for r in written["rows"]}
  assert rows["dense"]["noise_multiplier"] == 0.0 and rows["asymml_r2"]["rank"] == 2
  dp = rows["asymml_dp_eps8"]
  # sigma calibrated as training does (mnist_dp config, 210 steps): epsilon 8 achieved.
  assert dp["noise_multiplier"] > 0 and dp["clip"] == 0.01
  assert 8.0 - 1e-3 <= dp["epsilon"] <= 8.0 and dp["dp_steps"] == 210
  assert set(written["checks"]) == {
      "dense_ssim_at_least_0.6", "asymml_dp_eps8_ssim_below_0.2",
      "asymml_dp_eps8_best_of_decoder_and_prior_below_0.2"}
  assert {"prior_mean", "prior_blank"} == set(written["baselines"])
  png = (tmp_path / "attack_inversion.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  assert any(l.startswith("configuration") for l in lines)  # the final table
  assert not math.isnan(written["wall_seconds"])


@pytest.mark.parametrize("text,want", [
    ("dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8",
     ("dense", "asymml_r1", "asymml_r2", "asymml_r4", "asymml_dp_eps8")),
    (" Dense , asymml_dp_eps0.5 ", ("dense", "asymml_dp_eps0.5")),
])
def test_parse_configs(text, want):
  assert attack.parse_configs(text) == want


@pytest.mark.parametrize("text,match", [
    ("", "at least one"), ("gpu", "unknown configuration"), ("asymml_r0", "unknown"),
    ("asymml_dp_eps0", "unknown"), ("dense,dense", "twice"),
])
def test_parse_configs_refusals(text, match):
  with pytest.raises(ValueError, match=match):
    attack.parse_configs(text)


def test_settings_validation():
  with pytest.raises(ValueError, match="num_attacker"):
    attack.AttackSettings(num_attacker=0)
  with pytest.raises(ValueError, match="width"):
    attack.AttackSettings(width=0.0)
  with pytest.raises(ValueError, match="pretrain_steps"):
    attack.AttackSettings(pretrain_steps=-1)


def test_cli_bad_config_is_a_clear_error(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "experiments.attack_inversion", "--configs=gpu",
                      f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env, text=True,
                     capture_output=True, timeout=120)
  assert p.returncode != 0
  assert "unknown configuration 'gpu'" in p.stderr and "Traceback" not in p.stderr
  assert not (tmp_path / "w").exists()
