"""experiments/leakage.py: tiny run writes the MI table and the figure; clear errors."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax.evaluation import leakage as leakage_lib
from tests.helpers.experiments import import_experiment
from tests.helpers.tiny_model import tiny_staged_model

lk = import_experiment("experiments.leakage")

# s1 of the tiny model is 16x16x4 = 1024 features: wider than max_features, so sketched.
TINY = lk.LeakageSettings(num_samples=64, dim=2, k=3, max_features=512, sketch_dim=64,
                          pretrain_steps=0, chunk=32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("leakage")
  lines: list[str] = []
  model = tiny_staged_model(input_shape=(32, 32, 1), channels=(4, 4), num_classes=10)
  table = lk.run_leakage(configs=("dense", "asymml_dp_eps8"), workdir=str(workdir),
                         settings=TINY, log=lines.append, model=model)
  return workdir, table, lines


def test_tiny_run_writes_json_and_png(tiny_run):
  workdir, table, lines = tiny_run
  written = json.loads((workdir / "leakage.json").read_text())
  assert written == json.loads(json.dumps(table))
  assert written["configs"] == ["dense", "asymml_dp_eps8"]
  assert written["sites"] == {"activation": ["s1"], "output_gradient": ["conv1"],
                              "weight_gradient": ["conv0", "conv1", "all"]}
  assert written["estimator"]["n"] == 64 and written["estimator"]["dim"] == 2
  assert [r["rho"] for r in written["estimator_check"]] == [0.0, 0.5, 0.9, 0.99]
  dense, dp = written["results"]["dense"], written["results"]["asymml_dp_eps8"]
  for row in (dense, dp):
    assert set(row["classes"]) == {"activation", "output_gradient", "weight_gradient"}
    for entries in row["classes"].values():
      for e in entries.values():
        assert e["exposed"] and e["mi_nats"] >= 0 and e["mi_shuffled_nats"] >= 0
  s1 = dense["classes"]["activation"]["s1"]
  assert s1["features"] == 1024 and s1["sketched"] and s1["fraction_of_dense"] == 1.0
  assert not dense["classes"]["activation"]["s1"].get("bound_nats")
  # DP: sigma calibrated as training does; bounds on the noised releases only.
  sigma = dp["noise_multiplier"]
  assert sigma > 0 and dp["clip"] == 0.01 and 8.0 - 1e-3 <= dp["epsilon"] <= 8.0
  act = dp["classes"]["activation"]["s1"]
  assert act["bound_nats"] <= act["bound_dimension_free_nats"] == pytest.approx(
      1 / (2 * sigma ** 2))
  assert dp["classes"]["output_gradient"]["conv1"]["bound_nats"] > 0
  assert dp["classes"]["weight_gradient"]["all"]["bound_nats"] is None  # not covered
  # L = 2 releases a step (s1's residual and conv1's dY_R).
  assert dp["releases_per_step"] == 2
  assert dp["bound_step_nats"] == pytest.approx(
      act["bound_nats"] + dp["classes"]["output_gradient"]["conv1"]["bound_nats"])
  assert "asymml_dp_eps8_activation_mi_below_10pct_of_dense" in written["checks"]
  assert set(written["checks"]) <= {
      f"asymml_dp_eps8_{c}_mi_below_10pct_of_dense"
      for c in ("activation", "output_gradient", "weight_gradient")}
  png = (workdir / "leakage.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
  assert any(l.startswith("configuration") for l in lines)  # the final table
  assert written["wall_seconds"] > 0 and not math.isnan(written["cpu_seconds"])


def test_noise_lowers_the_measured_activation_leakage(tiny_run):
  _, table, _ = tiny_run
  dense = table["results"]["dense"]["classes"]["activation"]["s1"]["mi_nats"]
  dp = table["results"]["asymml_dp_eps8"]["classes"]["activation"]["s1"]["mi_nats"]
  assert dense > 0.3 and dp < 0.5 * dense


def test_estimate_is_leakage_mutual_information():
  g = np.random.default_rng(0)
  images = g.standard_normal((120, 6, 6, 1))
  exposed = images.reshape(120, -1)[:, :20] @ g.standard_normal((20, 30)) \
      + g.standard_normal((120, 30))
  settings = lk.LeakageSettings(num_samples=120, dim=3, k=3, pca_solver="exact")
  x_proj = leakage_lib.pca_project(images, 3)
  got = lk.estimate(x_proj, exposed, settings, np.arange(120))
  want = leakage_lib.mutual_information(images, exposed, dim=3, k=3)
  assert got["mi_nats"] == want["mi_nats"] == got["mi_shuffled_nats"]  # identity permutation
  shuffled = lk.estimate(x_proj, exposed, settings, g.permutation(120))
  assert shuffled["mi_shuffled_nats"] < 0.5 * got["mi_nats"]


def test_sketch_is_a_fixed_balanced_signed_block_sum():
  sk = lk.Sketches(seed=3, max_features=10, sketch_dim=4)
  assert not sk.needed(10) and sk.needed(11)
  tables = sk.tables({"a/x": 10, "b/y": 11})
  assert set(tables) == {"b/y"}
  perm, signs = tables["b/y"]
  np.testing.assert_array_equal(np.sort(perm), np.arange(11))
  np.testing.assert_array_equal(sk.tables({"b/y": 11})["b/y"][0], perm)  # fixed
  rows = np.random.default_rng(0).standard_normal((2, 11)).astype(np.float32)
  got = np.asarray(sk.apply(jnp.asarray(rows), (jnp.asarray(perm), jnp.asarray(signs))))
  # The same map as a dense matrix: output j sums inputs perm[3j .. 3j+2] with their signs.
  mat = np.zeros((11, 4), np.float32)
  for pos, (i, s) in enumerate(zip(perm, signs)):
    mat[i, pos // 3] = s
  np.testing.assert_allclose(got, rows @ mat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("text,want", [
    ("dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8",
     ("dense", "asymml_r1", "asymml_r2", "asymml_r4", "asymml_dp_eps8")),
    (" Dense , asymml_dp_eps0.5 ", ("dense", "asymml_dp_eps0.5")),
])
def test_parse_configs(text, want):
  assert lk.parse_configs(text) == want


@pytest.mark.parametrize("text,match", [
    ("", "at least one"), ("gpu", "unknown configuration"), ("asymml_r0", "unknown"),
    ("asymml_dp_eps0", "unknown"), ("dense,dense", "twice"),
])
def test_parse_configs_refusals(text, match):
  with pytest.raises(ValueError, match=match):
    lk.parse_configs(text)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_samples": 0}, "num_samples"), ({"num_samples": 4, "k": 3}, "exceed"),
    ({"dim": 0}, "dim"), ({"sketch_dim": 2, "dim": 4}, "sketch_dim"),
    ({"pca_solver": "arpack"}, "pca_solver"), ({"width": 0.0}, "width"),
    ({"pretrain_steps": -1}, "pretrain_steps"), ({"chunk": 0}, "chunk"),
])
def test_settings_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lk.LeakageSettings(**kwargs)
