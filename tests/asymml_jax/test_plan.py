"""Tests of asymml_jax.plan, the split planner and its MAC/byte cost model (DESIGN section 5).

The expected costs below are derived by hand from the formulas in the
``asymml_jax.plan`` module docstring, for one forward pass over a batch of
``B`` samples, a site of ``H x W x C`` (``HW = H * W``) read by convolutions
with ``k x k`` kernels, ``Cout`` outputs and ``HW_out`` output pixels, rank
``r`` and ``n`` subspace iterations:

* dense (= fully trusted) MACs: ``B * sum_conv k^2 C Cout HW_out``;
* split, trusted MACs: ``B * (2n + 4) HW C r`` (subspace iteration and
  projections) ``+ B * sum_conv HW_out k^2 r Cout`` (low-rank convs)
  ``+ F * sum_conv k^2 C r Cout`` (kernel folds), ``F = B`` per sample and
  ``F = 1`` per batch;
* split, untrusted MACs: the dense MACs (``conv(R, W)`` on the accelerator);
* split, bytes across: ``4 B (HW C + sum_conv HW_out Cout)`` (float32 ``R``
  out, ``Y_R`` back).

They are written out as explicit integer arithmetic rather than computed with
``ConvSpec.macs`` or ``plan.site_costs``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from asymml_jax import plan as plan_lib
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import MODELS, get_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# rank_fraction 1/16, always r_max columns (tau = 0), two subspace iterations.
DECOMP = DecompositionConfig(rank_fraction=1.0 / 16.0, tau=0.0, num_iters=2)
DECOMP_PB = DecompositionConfig(rank_fraction=1.0 / 16.0, tau=0.0, num_iters=2,
                                scope="per_batch")

# VGG16 convolutions at 224x224 as (input HW, C, Cout); 3x3, stride 1,
# padding 1, so HW_out = HW; 2x2 max pools between the blocks.
VGG16_224 = (
    [(224 * 224, 3, 64), (224 * 224, 64, 64)]
    + [(112 * 112, 64, 128), (112 * 112, 128, 128)]
    + [(56 * 56, 128, 256)] + [(56 * 56, 256, 256)] * 2
    + [(28 * 28, 256, 512)] + [(28 * 28, 512, 512)] * 2
    + [(14 * 14, 512, 512)] * 3)


@pytest.fixture(scope="module")
def vgg11_32():
  return get_model("vgg11", input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def vgg16_32():
  return get_model("vgg16", input_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def vgg16_224():
  return get_model("vgg16", input_shape=(224, 224, 3))


# ----------------------------------------------------------------------------
# The cost model against hand-derived numbers
# ----------------------------------------------------------------------------


def _subspace(hw: int, c: int, r: int, batch: int, per_batch: bool = False) -> int:
  """The subspace estimate's MACs, restated: ``2 n_iter + 2 = 6`` thin products of
  ``r + 2`` columns over the (strided, at most ~max(32 C, 1024) rows) pixel sample, or the
  ``C x C`` Gram of a tall sample plus 3 products with it."""
  rows = hw * (batch if per_batch else 1)
  stride = -(-rows // max(32 * c, 1024))
  n = -(-rows // stride) if stride >= 2 else rows
  k = min(c, r + 2)
  one = n * c * c + 3 * c * c * k if n >= 16 * c else 6 * n * c * k
  return one * (1 if per_batch else batch)


def test_vgg11_site_costs_by_hand(vgg11_32):
  # vgg11 at 32x32: conv0 (3->64) then a 2x2 max pool, so site s1 is
  # 16x16x64, read by conv1 (3x3, pad 1, 64->128, HW_out = 256).
  # B = 2, r = ceil(64 / 16) = 4, n = 2 (so 2n + 4 = 8):
  #   dense     = 2 * 256*9*64*128                 = 2 * 18,874,368 = 37,748,736
  #   decomp    = 2 * 8*256*64*4                   = 2 *    524,288
  #   lowrank   = 2 * 256*9*4*128                  = 2 *  1,179,648
  #   fold      =     9*64*4*128                   =        294,912 (once)
  #   per_sample trusted = 2 * (524,288 + 1,179,648 + 294,912) = 3,997,696
  #   per_batch  trusted = 2 * (524,288 + 1,179,648) + 294,912 = 3,702,784
  #   bytes     = 4 * 2 * (256*64 + 256*128)       = 393,216
  assert vgg11_32.site_shapes["s1"] == (16, 16, 64)
  dense = 2 * 256 * 9 * 64 * 128
  decomp = _subspace(256, 64, 4, 2) + 2 * 2 * 256 * 64 * 4  # estimate, P and R
  lowrank = 2 * 256 * 9 * 4 * 128
  fold = 9 * 64 * 4 * 128
  nbytes = 4 * 2 * (256 * 64 + 256 * 128)
  assert (dense, decomp + lowrank + 2 * fold, decomp + lowrank + fold, nbytes) == (
      37_748_736, 4_390_912, 4_096_000, 393_216)

  ps = plan_lib.make_plan(vgg11_32, 2, DECOMP).sites["s1"]
  assert (ps.mode, ps.r_max, ps.consumers) == ("per_sample", 4, ("conv1",))
  assert (ps.dense_macs, ps.trusted_macs, ps.untrusted_macs, ps.bytes_across) == (
      37_748_736, 4_390_912, 37_748_736, 393_216)

  pb = plan_lib.make_plan(vgg11_32, 2, DECOMP_PB).sites["s1"]
  assert (pb.mode, pb.dense_macs, pb.trusted_macs, pb.untrusted_macs,
          pb.bytes_across) == ("per_batch", 37_748_736, 4_096_000, 37_748_736,
                               393_216)

  forced = plan_lib.make_plan(vgg11_32, 2, DECOMP, force="trusted").sites["s1"]
  assert (forced.trusted_macs, forced.untrusted_macs, forced.bytes_across) == (
      37_748_736, 0, 0)
  dense_site = plan_lib.make_plan(vgg11_32, 2, DECOMP, force="dense").sites["s1"]
  assert (dense_site.trusted_macs, dense_site.untrusted_macs,
          dense_site.bytes_across) == (0, 37_748_736, 393_216)


def test_vgg11_training_costs_by_hand(vgg11_32):
  # Site s1 as above (B = 2, r = 4, n = 2), per sample, one training step:
  #   forward trusted = 3,997,696 (above); projections 2 * 2*256*64*4 = 262,144
  #   backward        = 2 * (lowrank 2,359,296 + folds 589,824) + projections 262,144
  #                   = 6,160,384, so trusted = 10,158,080; dense = 3 * 37,748,736
  # Gradient protection of conv1's 16x16x128 output gradient (r = ceil(128/16) = 8):
  #   per sample 8*256*128*8 (decomposition, 2n + 4 = 8) + 2 * 9*64*128*8 (fold
  #   W Q and corr(R, P) Q^T) + 2 * 256*9*64*8 (conv^T(P, W Q), corr(R, P))
  #   = 2,097,152 + 1,179,648 + 2,359,296 = 5,636,096, times B = 11,272,192.
  assert (2 * 2 * 256 * 64 * 4, 4_390_912 + 2 * (2 * 256 * 9 * 4 * 128 + 2 * 9 * 64 * 4 * 128)
          + 262_144) == (262_144, 10_551_296)
  protection = (_subspace(256, 128, 8, 2) + 2 * 2 * 256 * 128 * 8
                + 2 * (2 * 9 * 64 * 128 * 8 + 2 * 256 * 9 * 64 * 8))
  assert protection == 12_058_624
  ps = plan_lib.make_plan(vgg11_32, 2, DECOMP).sites["s1"]
  assert (ps.dense_macs_train, ps.trusted_macs_train, ps.protection_macs) == (
      3 * 37_748_736, 10_551_296, 12_058_624)
  forced = plan_lib.make_plan(vgg11_32, 2, DECOMP, force="trusted").sites["s1"]
  assert (forced.trusted_macs_train, forced.protection_macs) == (3 * 37_748_736, 0)
  dense_site = plan_lib.make_plan(vgg11_32, 2, DECOMP, force="dense").sites["s1"]
  assert (dense_site.trusted_macs_train, dense_site.dense_macs_train) == (0, 3 * 37_748_736)


def test_training_ratio_counts_gradient_protection(vgg16_32):
  from asymml_jax.privacy.config import PrivacyConfig
  off = plan_lib.make_plan(vgg16_32, 32, DECOMP,
                           privacy=PrivacyConfig(gradient_protection="none"))
  on = plan_lib.make_plan(vgg16_32, 32, DECOMP,
                          privacy=PrivacyConfig(gradient_protection="decompose"))
  assert not off.protects_gradients and on.protects_gradients
  assert off.dense_macs_train == on.dense_macs_train == 3 * off.dense_macs
  assert off.trusted_macs_train == sum(s.trusted_macs_train for s in off.sites.values())
  assert on.trusted_macs_train == off.trusted_macs_train + sum(
      s.protection_macs for s in on.sites.values())
  # Protection costs the TEE extra backward work: a lower training ratio, and
  # here lower than the forward ratio; without it the backward of a split site
  # is cheap (no subspace estimate), so its training ratio beats the forward's.
  assert 1.0 < on.trusted_mac_ratio_train < off.trusted_mac_ratio_train
  assert on.trusted_mac_ratio_train < on.trusted_mac_ratio
  split_only = plan_lib.make_plan(vgg16_32, 32, DECOMP, force="per_sample",
                                  privacy=PrivacyConfig(gradient_protection="none"))
  s1 = split_only.sites["s1"]
  assert s1.dense_macs_train / s1.trusted_macs_train > s1.dense_macs / s1.trusted_macs
  tee = plan_lib.make_plan(vgg16_32, 32, DECOMP, force="trusted")
  assert tee.trusted_mac_ratio_train == pytest.approx(1.0)


def test_two_consumer_site_costs_by_hand():
  # resnet20 at 32x32 (no stem pool): b3_in is 32x32x16, read by the first
  # block of the second layer: b3_conv1 (3x3/2, pad 1, 16->32) and the
  # shortcut b3_sc (1x1/2, pad 0, 16->32), both with a 16x16 output.
  # B = 1, r = ceil(16 / 16) = 1, n = 2:
  #   dense   = 256*9*16*32 + 256*1*16*32    = 1,179,648 + 131,072 = 1,310,720
  #   decomp  = 8*1024*16*1                  = 131,072 (once for both convs)
  #   lowrank = 256*9*1*32 + 256*1*1*32      = 73,728 + 8,192
  #   fold    = 9*16*1*32 + 1*16*1*32        = 4,608 + 512
  #   trusted = 131,072 + 81,920 + 5,120     = 218,112
  #   bytes   = 4 * (1024*16 + 256*32 + 256*32) = 131,072 (R sent once)
  model = get_model("resnet20", input_shape=(32, 32, 3))
  assert model.site_shapes["b3_in"] == (32, 32, 16)
  s = plan_lib.make_plan(model, 1, DECOMP).sites["b3_in"]
  assert s.consumers == ("b3_conv1", "b3_sc")
  assert (s.mode, s.r_max) == ("per_sample", 1)
  assert s.dense_macs == 256 * 9 * 16 * 32 + 256 * 16 * 32 == 1_310_720
  assert s.untrusted_macs == 1_310_720
  assert s.trusted_macs == (_subspace(1024, 16, 1, 1) + 2 * 1024 * 16 + 256 * 9 * 32
                            + 256 * 32 + 9 * 16 * 32 + 16 * 32) == 384_256
  assert s.bytes_across == 4 * (1024 * 16 + 2 * 256 * 32) == 131_072


def test_vgg16_224_dense_macs_are_the_known_15_35_gmacs(vgg16_224):
  # sum_l 9 * HW * C * Cout over the 13 convs (3x3, padding 1): the
  # well-known ~15.35 GMACs (~30.7 GFLOPs) of VGG16's conv layers.
  expected = sum(9 * hw * c * cout for hw, c, cout in VGG16_224)
  assert expected == 15_346_630_656
  p = plan_lib.make_plan(vgg16_224, 1, DECOMP)
  assert p.dense_macs == 15_346_630_656
  assert p.untrusted_macs == 15_346_630_656  # every site splits at 224
  assert plan_lib.make_plan(vgg16_224, 3, DECOMP).dense_macs == 3 * 15_346_630_656


def test_vgg16_224_per_sample_ratio(vgg16_224):
  # Every site splits per sample; trusted MACs per conv are
  # 8*HW*C*r + 9*HW*r*Cout + 9*C*r*Cout with r = ceil(C / 16).  The ideal
  # C / r = 16 is not reached: decomposition (8 HW C r) costs about as much
  # as the low-rank conv itself, and the per-sample fold (9 C r Cout)
  # dominates at 28x28 and 14x14 with C = 512.  The result is ~7.13x
  # (2,134,582,033 trusted MACs), not > 8x; per-batch subspaces at batch 32
  # amortise the folds and reach ~8.68x.
  p = plan_lib.make_plan(vgg16_224, 1, DECOMP)
  assert all(s.mode == "per_sample" for s in p.sites.values())
  expected = sum(_subspace(hw, c, math.ceil(c / 16), 1) + 2 * hw * c * math.ceil(c / 16)
                 + 9 * hw * math.ceil(c / 16) * cout + 9 * c * math.ceil(c / 16) * cout
                 for hw, c, cout in VGG16_224)
  assert p.trusted_macs == expected == 2_134_582_033
  assert p.trusted_mac_ratio == pytest.approx(15_346_630_656 / 2_134_582_033)
  assert 7.0 < p.trusted_mac_ratio < 7.2

  pb = plan_lib.make_plan(vgg16_224, 32, DECOMP_PB)
  assert all(s.mode == "per_batch" for s in pb.sites.values())
  assert pb.trusted_mac_ratio > 8.5


# ----------------------------------------------------------------------------
# Mode choice
# ----------------------------------------------------------------------------


def test_rank_at_least_min_c_hw_runs_trusted(vgg11_32, vgg16_32):
  # vgg16 at 32: s12 is 2x2x512 with r_max = 32 >= min(512, 4).
  p = plan_lib.make_plan(vgg16_32, 1, DECOMP)
  s12 = p.sites["s12"]
  assert (s12.height, s12.width, s12.channels, s12.r_max) == (2, 2, 512, 32)
  assert s12.mode == "trusted"
  for s in p.sites.values():
    if s.r_max >= min(s.channels, s.height * s.width):
      assert s.mode == "trusted", s.site
      assert (s.trusted_macs, s.untrusted_macs, s.bytes_across) == (s.dense_macs, 0, 0)
  # rank_fraction 1 gives r_max = C everywhere: fully trusted.
  full = plan_lib.make_plan(vgg16_32, 4, DecompositionConfig(rank_fraction=1.0, tau=0.0))
  assert {s.mode for s in full.sites.values()} == {"trusted"}
  assert full.trusted_mac_ratio == 1.0
  # The boundary: vgg11's last site is 2x2x512 (HW = 4).  r_max = 4 = HW runs
  # trusted; r_max = 3 may split (and is cheaper: 7,182,336 < 9,437,184).
  at = plan_lib.make_plan(vgg11_32, 1, DecompositionConfig(
      rank_fraction=1.0 / 16.0, max_rank=4, tau=0.0)).sites["s7"]
  below = plan_lib.make_plan(vgg11_32, 1, DecompositionConfig(
      rank_fraction=1.0 / 16.0, max_rank=3, tau=0.0)).sites["s7"]
  assert (at.r_max, at.mode) == (4, "trusted")
  assert (below.r_max, below.mode) == (3, "per_sample")
  assert below.trusted_macs == (_subspace(4, 512, 3, 1) + 2 * 4 * 512 * 3 + 4 * 9 * 3 * 512
                                + 9 * 512 * 3 * 512) == 7_206_912
  assert below.dense_macs == 4 * 9 * 512 * 512 == 9_437_184


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_grayscale_input_site_stays_trusted(name):
  # C = 1 gives r_max = 1 = min(C, HW): the raw image never leaves.
  model = get_model(name, input_shape=(32, 32, 1))
  first = model.site_order[0]
  p = plan_lib.make_plan(model, 8, DECOMP_PB)
  s = p.sites[first]
  assert (s.channels, s.r_max, s.mode) == (1, 1, "trusted")
  assert (s.untrusted_macs, s.bytes_across) == (0, 0)
  # Forcing a split mode cannot send it out either.
  assert plan_lib.make_plan(model, 8, DECOMP, force="per_sample").mode(first) == "trusted"


def test_force_dense_and_trusted(vgg16_32):
  dense = plan_lib.make_plan(vgg16_32, 4, DECOMP, force="dense")
  assert {s.mode for s in dense.sites.values()} == {"dense"}
  assert dense.trusted_macs == 0
  assert dense.untrusted_macs == dense.dense_macs > 0
  assert all(s.bytes_across > 0 for s in dense.sites.values())
  assert all(not s.split and s.scope == "none" for s in dense.sites.values())

  trusted = plan_lib.make_plan(vgg16_32, 4, DECOMP, force="trusted")
  assert {s.mode for s in trusted.sites.values()} == {"trusted"}
  assert trusted.trusted_mac_ratio == 1.0
  assert trusted.trusted_macs == trusted.dense_macs == dense.dense_macs
  assert (trusted.untrusted_macs, trusted.bytes_across) == (0, 0)


@pytest.mark.parametrize("mode", plan_lib.SPLIT_MODES)
def test_force_split_mode_where_possible(vgg16_32, mode):
  p = plan_lib.make_plan(vgg16_32, 4, DECOMP, force=mode)
  for s in p.sites.values():
    can_split = s.r_max < min(s.channels, s.height * s.width)
    assert s.mode == (mode if can_split else "trusted"), s.site
    assert s.split == can_split and s.scope == (mode if can_split else "none")


@pytest.mark.parametrize("name,size,batch", [
    ("vgg16", 32, 32), ("vgg16", 224, 1), ("vgg16", 224, 8), ("vgg11", 32, 2),
    ("resnet18", 64, 16), ("resnet20", 32, 128)])
def test_allowing_per_batch_never_costs_more(name, size, batch):
  model = get_model(name, input_shape=(size, size, 3))
  ps = plan_lib.make_plan(model, batch, DECOMP)
  pb = plan_lib.make_plan(model, batch, DECOMP_PB)
  assert "per_batch" not in {s.mode for s in ps.sites.values()}
  assert pb.trusted_macs <= ps.trusted_macs
  for site in model.site_order:
    assert pb.sites[site].trusted_macs <= ps.sites[site].trusted_macs, site
  assert pb.dense_macs == ps.dense_macs
  # allow_per_batch overrides the scope either way.
  assert plan_lib.make_plan(model, batch, DECOMP_PB, allow_per_batch=False
                            ).trusted_macs == ps.trusted_macs
  assert plan_lib.make_plan(model, batch, DECOMP, allow_per_batch=True
                            ).trusted_macs == pb.trusted_macs


def test_vgg16_32_batch_32_chooses_per_batch(vgg16_32):
  ps = plan_lib.make_plan(vgg16_32, 32, DECOMP)
  pb = plan_lib.make_plan(vgg16_32, 32, DECOMP_PB)
  modes = [s.mode for s in pb.sites.values()]
  assert "per_batch" in modes
  assert pb.trusted_macs < ps.trusted_macs
  # ~2.16x per batch vs ~1.87x per sample: the 4x4 and 2x2 sites stay trusted.
  assert pb.trusted_mac_ratio == pytest.approx(pb.dense_macs / pb.trusted_macs)
  assert 2.1 < pb.trusted_mac_ratio < 2.2
  assert pb.trusted_mac_ratio > ps.trusted_mac_ratio


# ----------------------------------------------------------------------------
# Presentation and validation
# ----------------------------------------------------------------------------


def test_table_lists_every_site_and_the_ratio(vgg16_32):
  p = plan_lib.make_plan(vgg16_32, 32, DECOMP_PB)
  table = p.table()
  rows = {line.split()[0] for line in table.splitlines()[3:] if line.strip()}
  assert set(vgg16_32.site_order) <= rows
  assert f"{p.trusted_mac_ratio:.2f}x" in table
  assert f"trusted-MAC ratio {p.trusted_mac_ratio_train:.2f}x" in table
  assert f"{p.trusted_macs_train:,}" in table
  assert f"{p.trusted_macs:,}" in table and f"{p.dense_macs:,}" in table
  for s in p.sites.values():
    assert any(line.startswith(s.site + " ") and s.mode in line
               for line in table.splitlines()), s.site


def test_to_dict_is_json_serialisable(vgg11_32):
  p = plan_lib.make_plan(vgg11_32, 4, DECOMP_PB)
  d = json.loads(json.dumps(p.to_dict()))
  assert d["model"] == "vgg11" and d["batch_size"] == 4
  assert [s["site"] for s in d["sites"]] == list(vgg11_32.site_order)
  assert d["trusted_macs"] == p.trusted_macs
  assert d["dense_macs"] == sum(s["dense_macs"] for s in d["sites"])
  assert d["trusted_mac_ratio"] == pytest.approx(p.trusted_mac_ratio)
  assert d["trusted_mac_ratio_train"] == pytest.approx(p.trusted_mac_ratio_train)
  assert d["trusted_macs_train"] == p.trusted_macs_train
  assert d["sites"][1]["consumers"] == ["conv1"]


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_raises(vgg11_32, batch_size):
  with pytest.raises(ValueError, match="batch_size"):
    plan_lib.make_plan(vgg11_32, batch_size, DECOMP)


def test_bad_force_raises(vgg11_32):
  with pytest.raises(ValueError, match="force must be one of"):
    plan_lib.make_plan(vgg11_32, 1, DECOMP, force="gpu")


# ----------------------------------------------------------------------------
# The experiments.plan entry point
# ----------------------------------------------------------------------------


def _run_script(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.plan", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=120)


def test_script_writes_json(tmp_path, vgg11_32):
  out = tmp_path / "sub" / "plan.json"
  res = _run_script("--model=vgg11", "--input_size=32", "--batch_size=4",
                    "--scope=per_batch", f"--json={out}")
  assert res.returncode == 0, res.stderr
  assert "plan for vgg11, batch 4" in res.stdout
  assert "trusted-MAC ratio" in res.stdout
  d = json.loads(out.read_text())
  expected = plan_lib.make_plan(vgg11_32, 4, DECOMP_PB)
  assert d["model"] == "vgg11" and d["batch_size"] == 4
  assert [s["site"] for s in d["sites"]] == list(vgg11_32.site_order)
  assert d["trusted_macs"] == expected.trusted_macs
  assert d["bytes_across"] == expected.bytes_across
  assert sorted(os.listdir(out.parent)) == ["plan.json"]  # no temp file left


@pytest.mark.parametrize("flag,needle", [
    ("--model=vgg13", ", ".join(sorted(MODELS))),
    ("--input_size=16", "32"),
    ("--channels=0", "channels"),
    ("--rank_fraction=1.5", "(0, 1]"),
])
def test_script_bad_flags_exit_cleanly(flag, needle):
  res = _run_script(flag)
  assert res.returncode != 0
  assert needle in res.stderr
  assert "Traceback" not in res.stderr
  assert res.stdout == ""


def test_dp_plans_never_use_per_batch(vgg16_32):
  from asymml_jax.privacy.config import PrivacyConfig
  dp = PrivacyConfig(enabled=True, noise_multiplier=1.0)
  with pytest.raises(ValueError, match="per_batch subspaces mix samples"):
    plan_lib.make_plan(vgg16_32, 32, DecompositionConfig(scope="per_batch"), privacy=dp)
  with pytest.raises(ValueError, match="per_batch subspaces mix samples"):
    plan_lib.make_plan(vgg16_32, 32, force="per_batch", privacy=dp)
  plan = plan_lib.make_plan(vgg16_32, 32, privacy=dp)
  assert {s.mode for s in plan.sites.values()} <= {"per_sample", "trusted"}
  assert plan.to_dict()["privacy"]["enabled"] is True
