"""Tests of asymml_jax.roofline: peaks, the trusted-stage cost model, roofline times."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from asymml_jax import plan as plan_lib
from asymml_jax import roofline as rl
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from asymml_jax.privacy.config import PrivacyConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECOMP = DecompositionConfig(rank_fraction=1.0 / 16.0, tau=0.0, num_iters=2)
NO_PROTECTION = PrivacyConfig(gradient_protection="none")


@pytest.fixture(scope="module")
def vgg11():
  return get_model("vgg11", input_shape=(32, 32, 3), width=0.25)


def _plan(model, batch_size=4, force=None, privacy=NO_PROTECTION):
  return plan_lib.make_plan(model, batch_size, DECOMP, force=force, privacy=privacy)


def _total(costs):
  return sum(costs.values(), rl.StageCost())


# ------------------------------------------------------------------ peaks
def test_measure_peaks_positive_and_plausible():
  p = rl.measure_peaks(matmul_size=256, stream_bytes=4 << 20, repeats=2)
  assert isinstance(p, rl.Peaks)
  assert 1e8 < p.matmul_macs_per_s < 1e14   # 0.1 GMAC/s .. beyond any accelerator's fp32
  assert 1e8 < p.stream_bytes_per_s < 1e13
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.matmul_macs_per_s = 1.0  # type: ignore[misc]
  assert rl.Peaks.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_cli_prints_peaks_pinned_to_a_core():
  core = sorted(os.sched_getaffinity(0))[-1]
  res = subprocess.run(
      [sys.executable, "-m", "asymml_jax.roofline", f"--cores={core}", "--matmul_size=128",
       "--stream_mb=2", "--repeats=1"],
      cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
      text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  p = rl.Peaks.from_dict(json.loads(res.stdout.strip().splitlines()[-1]))
  assert p.matmul_macs_per_s > 0 and p.stream_bytes_per_s > 0


def test_roofline_time_is_the_max_of_compute_and_memory():
  peaks = rl.Peaks(matmul_macs_per_s=1e9, stream_bytes_per_s=1e9)
  compute_bound = rl.StageCost(macs=4_000_000, bytes_read=1_000, bytes_written=1_000)
  memory_bound = rl.StageCost(macs=10, bytes_read=3_000_000, bytes_written=2_000_000)
  assert rl.roofline_time(compute_bound, peaks) == pytest.approx(4e-3)
  assert rl.roofline_time(memory_bound, peaks) == pytest.approx(5e-3)
  assert memory_bound.bytes == 5_000_000
  assert (compute_bound + memory_bound).macs == 4_000_010
  assert compute_bound.scaled(2, 3) == rl.StageCost(8_000_000, 3_000, 3_000)


# ------------------------------------------------------------------ formulas
def test_decomposition_and_protection_formulas_by_hand():
  # 8x8x16 activation, r = 2 (+2 oversampling), n = 2: (2n + 2) HW C (r + 2) per
  # sample on the thin path; per batch the same over all 192 rows (< 16 C: thin too).
  assert rl.decomposition_macs(8, 8, 16, 2, 2, 3, "per_sample") == 3 * 6 * 64 * 16 * 4
  assert rl.decomposition_macs(8, 8, 16, 2, 2, 3, "per_batch") == 6 * 192 * 16 * 4
  # 224x224x64 per sample: stride ceil(50176 / 2048) = 25, ceil(50176 / 25) = 2008 rows, their Gram.
  assert rl.decomposition_macs(224, 224, 64, 4, 2, 1, "per_sample") == (
      2008 * 64 * 64 + 3 * 64 * 64 * 6)
  assert rl.projection_macs(8, 8, 16, 2, 3) == 3 * 2 * 64 * 16 * 2
  conv = get_model("vgg11", input_shape=(32, 32, 3)).convs["conv1"]  # 3x3, 64 -> 128
  # Output gradient 16x16x128, r = 8: decomposition 8 * 256 * 128 * 8 per sample,
  # fold and Q^T 2 * 9*64*128*8, conv^T and corr 2 * 256*9*64*8.
  per_sample = (6 * 256 * 128 * 10 + 2 * 256 * 128 * 8 + 2 * 9 * 64 * 128 * 8
                + 2 * 256 * 9 * 64 * 8)
  assert rl.gradient_protection_macs(conv, 16, 16, 8, 2, 2) == 2 * per_sample


def test_per_batch_fold_is_counted_once(vgg11):
  conv = vgg11.convs["conv1"]
  h, w, c = vgg11.site_shapes[conv.site]
  r = 4
  fold_one = 9 * c * r * conv.features
  per_batch = [rl.lowrank_cost(conv, h, w, r, b, "per_batch").macs for b in (1, 2, 5)]
  per_sample = [rl.lowrank_cost(conv, h, w, r, b, "per_sample").macs for b in (1, 2, 5)]
  assert per_sample == [b * per_sample[0] for b in (1, 2, 5)]
  assert per_batch[2] - per_batch[1] == 3 * (per_batch[0] - fold_one)
  assert per_sample[2] - per_batch[2] == 4 * fold_one


# ------------------------------------------------------------------ stages
def test_stage_keys_in_execution_order(vgg11):
  costs = rl.stage_costs(vgg11, _plan(vgg11), 4, train=True)
  n = vgg11.num_stages
  assert list(costs) == ([f"forward/{k}" for k in range(n)]
                         + [f"backward/{k}" for k in reversed(range(n))])
  assert list(rl.stage_costs(vgg11, _plan(vgg11), 4, train=False)) == [
      f"forward/{k}" for k in range(n)]
  for c in costs.values():
    assert c.bytes_read > 0 and c.bytes_written > 0


@pytest.mark.parametrize("protect", [False, True])
def test_stage_macs_add_up_to_the_plan(vgg11, protect):
  privacy = PrivacyConfig() if protect else NO_PROTECTION
  plan = _plan(vgg11, 4, privacy=privacy)
  assert plan.protects_gradients == protect
  assert {s.mode for s in plan.sites.values()} >= {"per_sample", "trusted"}
  fwd = rl.stage_costs(vgg11, plan, 4, train=False)
  assert _total(fwd).macs == plan.trusted_macs
  assert _total(rl.stage_costs(vgg11, plan, 4, train=True)).macs == plan.trusted_macs_train


def test_gradient_protection_adds_backward_work_only(vgg11):
  off = rl.stage_costs(vgg11, _plan(vgg11), 4, train=True)
  on = rl.stage_costs(vgg11, _plan(vgg11, privacy=PrivacyConfig()), 4, train=True)
  for key in off:
    if key.startswith("forward/"):
      assert on[key] == off[key]
  assert _total(on).macs > _total(off).macs and _total(on).bytes > _total(off).bytes


def test_costs_scale_with_batch_size(vgg11):
  plan = _plan(vgg11, force="per_sample")
  one = rl.stage_costs(vgg11, plan, 1, train=True)
  three = rl.stage_costs(vgg11, plan, 3, train=True)
  for key in one:
    assert three[key].macs == 3 * one[key].macs, key
    # activations scale with the batch; the kernels read do not
    assert one[key].bytes < three[key].bytes <= 3 * one[key].bytes, key
  pb = _plan(vgg11, force="per_batch")
  assert (_total(rl.stage_costs(vgg11, pb, 3, train=False)).macs
          < 3 * _total(rl.stage_costs(vgg11, pb, 1, train=False)).macs)


def test_trusted_backward_is_twice_the_forward_and_whole_step_sums(vgg11):
  plan = _plan(vgg11, force="trusted")
  costs = rl.stage_costs(vgg11, plan, 2, train=True)
  for k in range(vgg11.num_stages):
    fwd, bwd = costs[f"forward/{k}"], costs[f"backward/{k}"]
    assert bwd.macs == 2 * fwd.macs and bwd.bytes == 2 * fwd.bytes
  whole = rl.stage_costs(vgg11, plan, 2, train=True, whole_step=True)
  assert list(whole) == ["whole_step/0"]
  assert whole["whole_step/0"] == _total(costs)
  assert whole["whole_step/0"].macs == 3 * plan_lib.make_plan(
      vgg11, 2, DECOMP, force="trusted").dense_macs


def test_split_stage_costs_less_than_trusted(vgg11):
  split = _total(rl.stage_costs(vgg11, _plan(vgg11, force="per_sample"), 4, train=True))
  trusted = _total(rl.stage_costs(vgg11, _plan(vgg11, force="trusted"), 4, train=True))
  assert split.macs < trusted.macs


def test_compare_reports_efficiency_and_whole_step():
  costs = {"forward/0": rl.StageCost(1_000_000, 0, 0), "forward/1": rl.StageCost(10, 4_000, 0)}
  peaks = rl.Peaks(matmul_macs_per_s=1e9, stream_bytes_per_s=1e6)
  out = rl.compare(costs, peaks, {"forward/0": 4e-3}, 0.02)
  assert out["stages"]["forward/0"]["roofline_s"] == pytest.approx(1e-3)
  assert out["stages"]["forward/0"]["efficiency"] == pytest.approx(0.25)
  assert out["stages"]["forward/1"]["trusted_compute_s"] is None
  assert out["stages"]["forward/1"]["efficiency"] is None
  whole = out["whole_step"]
  assert whole["roofline_s"] == pytest.approx(5e-3)
  assert whole["efficiency"] == pytest.approx(0.25)
  assert whole["macs"] == 1_000_010 and whole["bytes"] == 4_000
  json.dumps(out)
