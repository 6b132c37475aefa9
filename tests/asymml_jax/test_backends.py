"""The central invariant for every model family and backend, and backend mechanics."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import backends as bk
from asymml_jax import precision, verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model

TOL = 1e-4  # float32 summation-order differences only (DESIGN section 5)
DEC = DecompositionConfig(rank_fraction=0.25, tau=0.1)
B = 3  # the invariant's batch; the mechanics tests below reuse its model, batch and
# decomposition, so their programs are the ones the invariant cases compiled (one
# persistent XLA cache per run) and they spend their time on what they check


# ResNet-8: the CIFAR ResNet layout of ResNet20 with one basic block per group
# (6n + 2 layers, n = 1): an identity-shortcut block and two projection-shortcut
# blocks, all three widths, but 8 stages instead of 20, so the local backend
# compiles 8 trusted stage programs (and their VJPs) instead of 20.
_SHALLOW = {"resnet8": dict(widths=(16, 32, 64), blocks=(1, 1, 1), imagenet_stem=False)}


@functools.lru_cache(maxsize=None)
def _model(name, width, size=32, channels=3, norm="batch"):
  if name in _SHALLOW:
    resnet_lib = importlib.import_module("asymml_jax.models.resnet")  # not the function
    with pytest.MonkeyPatch.context() as mp:
      mp.setitem(resnet_lib.ARCHS, name, _SHALLOW[name])
      return resnet_lib.resnet(name, input_shape=(size, size, channels), width=width,
                               norm=norm)
  return get_model(name, input_shape=(size, size, channels), width=width, norm=norm)


# Narrow models keep compile and run time small; the invariant does not depend on width.
# float64 is the sharp form (verify.FLOAT64_TOLERANCE, no ReLU flips at float32
# rounding); one float32 case keeps the float32 path honest at TOL.
BOTH = "inline+local"  # (a string: readable test ids)
CASES = [
    # local on vgg11 with BatchNorm: the enclave test (tests/enclave_bridge/test_client.py)
    # runs the same callback hook and executor on it, across the process boundary
    ("vgg11", 0.25, 32, 3, "batch", None, "inline", "float32"),
    ("vgg11", 0.25, 32, 1, "group", None, BOTH, "float64"),  # grayscale: conv0 all trusted
    # the ResNet family in the default run: every block kind of ResNet20 (identity and
    # projection shortcuts, the carry across stages), in 8 stages
    ("resnet8", 0.25, 32, 3, "batch", None, BOTH, "float64"),
    # ResNet20 itself: 20 stages, ~2 min of local-backend compilation on 2 cores
    pytest.param("resnet20", 0.25, 32, 3, "batch", None, BOTH, "float64",
                 marks=pytest.mark.slow),
    # per_batch scope: also covered by test_layers/test_ops; kept out of the default run for time
    pytest.param("vgg11", 0.25, 32, 3, "group", "per_batch", BOTH, "float64",
                 marks=pytest.mark.slow),
    # ResNet18 reaches 1x1 spatial size at 32x32, where float32 dense itself moves by
    # more than 1e-4 under rounding-sized perturbations; float64 has no such floor.
    pytest.param("resnet18", 0.125, 32, 3, "group", "per_batch", BOTH, "float64",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,width,size,channels,norm,force,backends,dtype", CASES)
def test_split_backends_match_dense(name, width, size, channels, norm, force, backends,
                                    dtype):
  model = _model(name, width, size, channels, norm)
  backends = backends.split("+")
  result = verify.compare(model, backends, batch_size=B, decomposition=DEC,
                          force=force, floor=False, dtype=dtype)
  assert {r["name"] for r in result["backends"]} == set(backends)
  tol = verify.FLOAT64_TOLERANCE if dtype == "float64" else TOL
  assert result["tolerance"] == tol and result["passed"], result
  assert result["max_rel_err_loss"] <= tol and result["max_rel_err_grads"] <= tol, result
  # The split really happened somewhere (otherwise the check would be vacuous).
  modes = set().union(*[r["modes"] for r in result["backends"]])
  assert modes & {"per_sample", "per_batch"}


def test_comparison_detects_a_wrong_backend(monkeypatch):
  """Dropping the trusted low-rank half must break the invariant (the check can fail)."""
  from asymml_jax import stages
  model = _model("vgg11", 0.25)
  key = jax.random.key(0)
  v = model.init(key)
  batch = verify.random_batch(model, B)
  ref = bk.make_backend("dense", model, key=key, batch_size=B).grads(
      v["params"], v["batch_stats"], batch, 0)
  orig = stages.ops.lowrank_conv
  monkeypatch.setattr(stages.ops, "lowrank_conv",
                      lambda p, u, w, spec: 0.0 * orig(p, u, w, spec))
  out = bk.make_backend("inline", model, key=key, batch_size=B, decomposition=DEC).grads(
                            v["params"], v["batch_stats"], batch, 0)
  assert max(verify.tree_rel_errs(out[1], ref[1]).values()) > 100 * TOL


def test_inline_train_step_compiles_once():
  model = _model("vgg11", 0.25)
  v = model.init(jax.random.key(0))
  be = bk.make_backend("inline", model, key=jax.random.key(1), batch_size=B,
                       decomposition=DEC)
  for step in range(3):
    batch = verify.random_batch(model, B, seed=step)
    be.grads(v["params"], v["batch_stats"], batch, step)
  assert be._grad._cache_size() == 1


def test_local_backend_program_never_sees_private_inputs():
  """The untrusted program's inputs are the public weights, statistics and a step tag."""
  model = _model("vgg11", 0.25)
  v = model.init(jax.random.key(0))
  be = bk.make_backend("local", model, key=jax.random.key(1), batch_size=2)
  jaxpr = jax.make_jaxpr(functools.partial(be._grad, batch_size=2))(
      v["params"], v["batch_stats"], jnp.int32(0))
  shapes = [tuple(x.aval.shape) for x in jaxpr.jaxpr.invars]
  assert (2, 32, 32, 3) not in shapes and (2,) not in shapes
  n_public = len(jax.tree_util.tree_leaves((v["params"], v["batch_stats"])))
  assert len(shapes) == n_public + 1  # + the step tag


@pytest.fixture
def float64():
  with precision.computing_in("float64"):
    yield


def test_local_backend_drops_step_state_and_rejects_bad_batches(float64):
  model = _model("vgg11", 0.25, 32, 1, "group")  # the grayscale invariant case's programs
  v = model.init(jax.random.key(0))
  be = bk.make_backend("local", model, key=jax.random.key(1), batch_size=B,
                       decomposition=DEC)
  batch = verify.random_batch(model, B)
  be.grads(v["params"], v["batch_stats"], batch, 7)
  m = be.evaluate(v["params"], v["batch_stats"], batch, 0)
  assert float(m["count"]) == B
  assert be.executor.open_steps == ()
  assert be.executor._pending == {}  # nothing kept per finished step (it never prefetches)
  bad = dict(batch, image=np.repeat(batch["image"], 3, axis=-1))
  with pytest.raises(ValueError, match=r"expects images of shape"):
    be.grads(v["params"], v["batch_stats"], bad, 8)
  with pytest.raises(ValueError, match="needs the batch"):
    be.grads(v["params"], v["batch_stats"], None, 9)


def test_eval_metrics_agree_across_backends():
  model = _model("resnet20", 0.5)
  v = model.init(jax.random.key(0))
  batch = verify.random_batch(model, 3)
  batch["mask"][-1] = 0.0  # a padded example must not count
  ms = [bk.make_backend(n, model, key=jax.random.key(1), batch_size=3).evaluate(
      v["params"], v["batch_stats"], batch, 0) for n in ("dense", "inline")]
  assert float(ms[0]["count"]) == 2.0
  np.testing.assert_allclose(float(ms[0]["loss_sum"]), float(ms[1]["loss_sum"]), rtol=1e-4)
  assert float(ms[0]["correct"]) == float(ms[1]["correct"])


def test_unknown_backend_lists_choices():
  with pytest.raises(ValueError, match=r"choices: dense, (enclave, )?inline, local"):
    bk.make_backend("gpu_magic", _model("vgg11", 0.25), key=jax.random.key(0), batch_size=2)


def test_process_backend_without_the_bridge_says_how_to_get_it(monkeypatch):
  monkeypatch.setattr(bk, "_REGISTRY", {k: v for k, v in bk._REGISTRY.items()
                                        if k not in bk.PROCESS_BACKENDS})
  with pytest.raises(ValueError, match="import enclave_bridge first"):
    bk.make_backend("enclave", _model("vgg11", 0.25), key=jax.random.key(0), batch_size=2)


def test_dense_plan_has_no_trusted_macs_and_tee_only_plan_no_untrusted():
  model = _model("vgg11", 0.25)
  d = bk.make_plan_for("dense", model, 4, DecompositionConfig())
  t = bk.make_plan_for("tee_only", model, 4, DecompositionConfig())
  assert d.trusted_macs == 0 and d.untrusted_macs > 0
  assert t.untrusted_macs == 0 and t.trusted_mac_ratio == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["inline", "local"])
def test_calibrated_ranks_need_the_enclave_backend(name):
  model = get_model("vgg11", width=0.125)
  with pytest.raises(ValueError, match="enclave backend"):
    bk.make_backend(name, model, key=jax.random.key(0), batch_size=2,
                    decomposition=DecompositionConfig(rank_plan="calibrate"))
