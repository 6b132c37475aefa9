"""Slalom baseline: field arithmetic, Freivalds soundness, blinding, accuracy, backend.

Tiny models (width 0.125, 32x32), one batch shape per model, so that the
jitted TEE stages, accelerator layers and checks compile once per model; the
configurations (bits, prime) are traced arguments and recompile nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import backends as bk
from asymml_jax.baselines import slalom as sl
from asymml_jax.models import get_model
from asymml_jax.ops import ConvSpec

resnet_lib = importlib.import_module("asymml_jax.models.resnet")  # the module, not the function

B = 2
P = sl.DEFAULT_PRIME            # 2^24 - 3
P26 = 2**26 - 5                 # the largest prime below 2^26


def _init(model, seed: int):
  """Random weights and running statistics in ``model.init``'s layout (numpy: no compile).

  Kernels He-normal (fan-out) as ``model.init``; BatchNorm scale, bias and
  running mean/variance random, so the TEE's normalisation is exercised.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      fan_out = leaf.shape[-1] * (math.prod(leaf.shape[:2]) if leaf.ndim == 4 else 1)
      return rng.normal(0, math.sqrt(2 / fan_out), leaf.shape).astype(np.float32)
    if "scale" in name or "var" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)   # bias, mean

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def vgg():
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 3), width=0.125)
  variables = _init(model, 0)
  images = np.random.default_rng(0).standard_normal((B, 32, 32, 3)).astype(np.float32)
  logits, inputs = sl.reference_forward(variables, images, model=model)
  runner = sl.SlalomRunner(model, variables, sl.SlalomConfig(), jax.random.key(1))
  return dict(model=model, variables=variables, images=images, logits=np.asarray(logits),
              inputs=inputs, runner=runner)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ config
def test_config_defaults_are_the_papers():
  cfg = sl.SlalomConfig()
  assert (cfg.bits, cfg.prime, cfg.verify, cfg.repetitions) == (8, 2**24 - 3, True, 1)
  assert cfg.scale == 256
  assert cfg.soundness_error == pytest.approx(2 / P)
  assert cfg.output_limit == pytest.approx((P // 4) / 2**16)   # ~64
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.bits = 4  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=0), "bits"), (dict(bits=13), "bits"), (dict(bits=8.0), "bits"),
    (dict(prime=2**24), "prime"), (dict(prime=2**26 + 15), "prime"), (dict(prime=7), "prime"),
    (dict(bits=11, prime=P), "prime"), (dict(verify=1), "verify"),
    (dict(repetitions=0), "repetitions"), (dict(repetitions=True), "repetitions"),
])
def test_config_rejects(kwargs, field):
  with pytest.raises(ValueError, match=field):
    sl.SlalomConfig(**kwargs)


def test_is_prime():
  assert [n for n in range(40) if sl.is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]
  assert sl.is_prime(P) and sl.is_prime(P26) and not sl.is_prime(2**24 - 1)


# -------------------------------------------------------- field arithmetic
def _int_conv_mod(x, w, p):
  """Exact reference: NHWC x HWIO, stride 1, padding 1, python-int sums mod p."""
  b, h, wd, c = x.shape
  kh, kw, _, co = w.shape
  xp = np.zeros((b, h + 2, wd + 2, c), object)
  xp[:, 1:-1, 1:-1] = x.astype(object)
  out = np.zeros((b, h, wd, co), object)
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j].astype(object))
  return np.vectorize(lambda v: v % p)(out).astype(np.int64)


def test_field_linear_is_exact_mod_p():
  # Full-range field elements and weights up to 2^17: products up to 2^40 and
  # sums of 72 of them, beyond float32 and near float64's limits; exact here.
  rng = np.random.default_rng(0)
  spec = ConvSpec(name="c", site="s", in_features=8, features=5)
  x = rng.integers(0, P, (2, 5, 5, 8)).astype(np.int32)
  w = rng.integers(-2**17, 2**17, (3, 3, 8, 5))
  want = _int_conv_mod(np.where(x > P // 2, x.astype(np.int64) - P, x), w, P)
  with jax.enable_x64(True):
    got = sl.field_linear(jnp.asarray(x), jnp.asarray(w, jnp.float64), jnp.int32(P), spec=spec)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


@jax.jit
def _checks(x, y, w, v, s, p):
  """Freivalds' check of one (x~, y~) pair under many secret (v, s) draws (vmapped)."""
  spec = ConvSpec(name="c", site="s", in_features=3, features=4)
  return jax.vmap(lambda v, s: sl.freivalds_check(x, y, sl.fold_verifier(w, v, p), v, s, p,
                                                  spec=spec))(v, s)


def _freivalds_trials(p, n_trials, seed=0):
  """Pass rates of a correct and of a tampered (one element + 1) result."""
  spec = ConvSpec(name="c", site="s", in_features=3, features=4)
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    pj = jnp.int32(p)
    x = jnp.asarray(rng.integers(0, p, (3, 4, 4, 3)), jnp.int32)
    w = jnp.asarray(rng.integers(-(p // 2), p // 2 + 1, (3, 3, 3, 4)), jnp.float64)
    y = sl.field_linear(x, w, pj, spec=spec)
    bad = y.at[1, 2, 3, 0].set((y[1, 2, 3, 0] + 1) % p)
    v = jnp.asarray(rng.integers(0, p, (n_trials, 1, 4)), jnp.int32)
    s = jnp.asarray(rng.integers(0, p, (n_trials, 1, 3)), jnp.int32)
    return (float(jnp.mean(_checks(x, y, w, v, s, pj))),
            float(jnp.mean(_checks(x, bad, w, v, s, pj))))


def test_freivalds_soundness_rate_matches_the_bound():
  # A single wrong element E = e_{b,h,w,o} passes iff s_b v_o = 0 mod p:
  # probability 2/p - 1/p^2 exactly (the bound of the module docstring is
  # attained).  p = 13: 0.1479; 4000 trials, sd sqrt(q(1-q)/n) = 0.0056.
  p, n = 13, 4000
  q = 2 / p - 1 / p**2
  correct, tampered = _freivalds_trials(p, n)
  assert abs(tampered - q) < 5 * math.sqrt(q * (1 - q) / n), tampered
  assert correct == 1.0  # a correct result always passes


def test_freivalds_detects_at_the_default_prime():
  # (2/p) * 4000 = 5e-4 expected passes of the tampered result.
  assert _freivalds_trials(P, 4000, seed=1) == (1.0, 0.0)


# ------------------------------------------------------------ the runner
def _error_bound(model, variables, inputs, bits) -> float:
  """First-order bound on the logits' relative error from k-bit rounding.

  Rounding to a 2^-k grid adds uniform errors of RMS u = 2^-k / sqrt(12) to
  each input x and weight W of a linear layer; with m independent terms,
  |W dx|^2 ~ m E[W^2] u^2 and |dW x|^2 ~ m E[x^2] u^2 against |y|^2 ~ m E[W^2]
  E[x^2], a relative error eps_l = u sqrt(1/E[x^2] + 1/E[W^2]).  Normalisation
  (running statistics), ReLU and pooling are 1-Lipschitz and preserve relative
  errors to first order, so the logits' relative error is at most the sum of
  the eps_l (the triangle inequality; independent errors add in quadrature, so
  this is conservative).
  """
  u = 2.0**-bits / math.sqrt(12)
  prog = sl._program(model)
  total = 0.0
  for spec in prog.linears:
    if spec.name == sl.HEAD:
      last = variables["params"]["stages"][str(model.num_stages - 1)]
      w = sl._get_path(last, prog.head_path)["kernel"]
    else:
      w = variables["params"]["convs"][spec.name]["kernel"]
    ms_w = float(jnp.mean(jnp.square(w)))
    ms_x = float(jnp.mean(jnp.square(inputs[spec.site])))
    total += u * math.sqrt(1 / ms_x + 1 / ms_w)
  return total


def test_logits_match_dense_within_quantisation_error(vgg):
  runner = vgg["runner"]
  logits = np.asarray(runner.infer(vgg["images"]))
  assert logits.shape == (B, 10) and logits.dtype == np.float32
  err = _rel(logits, vgg["logits"])
  bound = _error_bound(vgg["model"], vgg["variables"], vgg["inputs"], 8)
  assert 0 < err < bound, (err, bound)
  t = runner.last_timing
  assert set(t) >= {"trusted_s", "untrusted_s", "precompute_s", "verify_s"}
  assert t["trusted_s"] > 0 and t["untrusted_s"] > 0 and t["precompute_s"] > 0
  assert 0 < t["verify_s"] <= t["trusted_s"]
  assert set(t["layers"]) == {*vgg["model"].convs, "head"}


def test_error_scales_with_the_bit_width(vgg):
  # Rounding errors scale as 2^-k: 4 more bits, 16x smaller (within a factor 2).
  errs = {}
  for bits, prime in ((6, P), (10, P26)):
    runner = sl.SlalomRunner(vgg["model"], vgg["variables"],
                             sl.SlalomConfig(bits=bits, prime=prime), jax.random.key(bits))
    errs[bits] = _rel(runner.infer(vgg["images"]), vgg["logits"])
    assert errs[bits] < _error_bound(vgg["model"], vgg["variables"], vgg["inputs"], bits)
  assert 8 < errs[6] / errs[10] < 32, errs


def test_tampered_results_are_rejected_naming_the_layer(vgg):
  runner = vgg["runner"]
  for layer in ("conv0", "conv5", "head"):
    def tamper(name, xt, yt, layer=layer):
      if name == layer:
        yt = yt.copy()
        yt.flat[yt.size // 3] = (int(yt.flat[yt.size // 3]) + 1) % P
      return yt
    with pytest.raises(sl.SlalomIntegrityError, match=f"layer {layer}") as info:
      runner.infer(vgg["images"], accelerator_hook=tamper)
    assert info.value.layer == layer and info.value.reason == "freivalds"
    assert runner.last_timing["rejected"]
  # Malformed answers are refused before any arithmetic.
  with pytest.raises(sl.SlalomIntegrityError, match="malformed"):
    runner.infer(vgg["images"], accelerator_hook=lambda n, x, y: y[:, :-1])
  with pytest.raises(sl.SlalomIntegrityError, match="dtype"):
    runner.infer(vgg["images"], accelerator_hook=lambda n, x, y: y.astype(np.float32))
  # The honest accelerator passes again (the check never rejects a correct result).
  np.testing.assert_allclose(runner.infer(vgg["images"]), runner.infer(vgg["images"]),
                             rtol=0, atol=0)


def test_without_verification_tampering_goes_unnoticed(vgg):
  runner = sl.SlalomRunner(vgg["model"], vgg["variables"], sl.SlalomConfig(verify=False),
                           jax.random.key(2))
  def tamper(name, xt, yt):
    return (yt + (name == "head") * 5000) % P  # shifts the logits by 5000 / 2^16
  logits = np.asarray(runner.infer(vgg["images"], accelerator_hook=tamper))
  np.testing.assert_allclose(logits - np.asarray(runner.infer(vgg["images"])),
                             5000 / 2**16, atol=1e-5)
  assert runner.last_timing["verify_s"] == 0.0


def test_accelerator_sees_fresh_uniform_blinded_inputs(vgg):
  runner = vgg["runner"]
  seen: list[dict] = [{}, {}]
  for i in range(2):
    def spy(name, xt, yt, i=i):
      seen[i][name] = xt
      return yt
    runner.infer(vgg["images"], accelerator_hook=spy)
  first = seen[0]["conv0"].astype(np.float64)
  x_q = np.round(vgg["images"] * 256)
  assert first.shape == vgg["images"].shape
  assert first.min() >= 0 and first.max() < P
  # Uniform on [0, p): mean p/2 (sd p/sqrt(12 n)), no correlation with the image.
  n = first.size
  assert abs(first.mean() / P - 0.5) < 5 / math.sqrt(12 * n)
  assert abs(np.corrcoef(first.ravel(), x_q.ravel())[0, 1]) < 5 / math.sqrt(n)
  # One-time pads: the same image is blinded differently on every call.
  for name in seen[0]:
    assert np.mean(seen[0][name] == seen[1][name]) < 0.01


def test_pads_are_precomputed_once_and_consumed(vgg):
  runner = sl.SlalomRunner(vgg["model"], vgg["variables"], sl.SlalomConfig(),
                           jax.random.key(3))
  assert runner.pending(B) == 0
  spent = runner.precompute(B, count=2)
  assert spent > 0 and runner.pending(B) == 2
  runner.infer(vgg["images"])
  assert runner.pending(B) == 1
  assert runner.last_timing["precompute_s"] > 0
  runner.load(vgg["variables"])  # new weights invalidate the unblinding factors
  assert runner.pending(B) == 0
  with pytest.raises(TypeError, match="PRNG key"):
    sl.SlalomRunner(vgg["model"], vgg["variables"], sl.SlalomConfig(), None)
  with pytest.raises(TypeError, match="PRNG key"):
    sl.SlalomRunner(vgg["model"], vgg["variables"], sl.SlalomConfig(), 0)


def _scaled(variables, layer, factor):
  convs = dict(variables["params"]["convs"])
  convs[layer] = dict(convs[layer], kernel=convs[layer]["kernel"] * factor)
  return {"params": dict(variables["params"], convs=convs),
          "batch_stats": variables["batch_stats"]}


def test_range_errors(vgg):
  runner = sl.SlalomRunner(vgg["model"], vgg["variables"], sl.SlalomConfig(),
                           jax.random.key(4))
  with pytest.raises(sl.SlalomRangeError, match="site s0"):
    runner.infer(vgg["images"] * 1e5)           # |x| >= p / 2^9 = 32768
  with pytest.raises(sl.SlalomRangeError, match="conv0"):
    runner.load(_scaled(vgg["variables"], "conv0", 1e6))   # W_q beyond p/2
  # conv7: m = 576 terms; max|W_q| ~ 2^21 keeps W_q < p/2 but m (p/2) max|W_q| > 2^52.
  w = vgg["variables"]["params"]["convs"]["conv7"]["kernel"]
  factor = 2.0**21 / 256 / float(jnp.max(jnp.abs(w)))
  with pytest.raises(sl.SlalomRangeError, match="conv7.*2\\^52"):
    runner.load(_scaled(vgg["variables"], "conv7", factor))
  runner.load(_scaled(vgg["variables"], "conv0", 300.0))   # outputs |y| > 64
  with pytest.raises(sl.SlalomRangeError, match="layer conv0"):
    runner.infer(vgg["images"])


def test_macs(vgg):
  m = vgg["runner"].macs(B)
  model = vgg["model"]
  shapes = sl._program(model).site_shapes
  dense = B * sum(c.macs(*shapes[c.site][:2]) for c in model.convs.values())
  assert m["untrusted"] == m["tee_only"] == dense + B * 64 * 10
  assert m["trusted_offline"] > m["tee_only"] > 10 * m["trusted_online"] > 0
  # VGG16 at 224 (abstract pass only): the online check costs ~1% of the TEE-only MACs.
  big = sl.slalom_macs(get_model("vgg16", num_classes=1000, input_shape=(224, 224, 3)), 1)
  assert big["tee_only"] / big["trusted_online"] > 50
  assert sl.slalom_macs(model, B, sl.SlalomConfig(verify=False))["trusted_online"] == 0


# --------------------------------------------------------------- models
def test_unsupported_model_is_named():
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 3), width=0.125)
  other = dataclasses.replace(model, name="mobilenet")
  with pytest.raises(ValueError, match="vgg11, vgg16, resnet18, resnet20"):
    sl.SlalomRunner(other, {}, sl.SlalomConfig(), jax.random.key(0))


def test_resnet_shortcuts(monkeypatch):
  # A two-block ResNet20 (the second block with a 1x1 strided shortcut conv
  # that shares conv1's blinded input): the full model is a slow test.
  monkeypatch.setitem(resnet_lib.ARCHS, "resnet20",
                      dict(widths=(16, 32), blocks=(1, 1), imagenet_stem=False))
  model = get_model("resnet20", num_classes=10, input_shape=(32, 32, 3), width=0.25)
  assert "b1_sc" in model.convs
  variables = _init(model, 5)
  images = np.random.default_rng(5).standard_normal((B, 32, 32, 3)).astype(np.float32)
  want, inputs = sl.reference_forward(variables, images, model=model)
  runner = sl.SlalomRunner(model, variables, sl.SlalomConfig(), jax.random.key(6))
  seen = {}
  got = runner.infer(images, accelerator_hook=lambda n, x, y: seen.setdefault(n, x) is x and y)
  assert _rel(got, want) < _error_bound(model, variables, inputs, 8)
  np.testing.assert_array_equal(seen["b1_sc"], seen["b1_conv1"])  # one pad per site, shared
  with pytest.raises(sl.SlalomIntegrityError, match="b1_sc"):
    runner.infer(images, accelerator_hook=lambda n, x, y: (y + (n == "b1_sc")) % P)


# -------------------------------------------------------------- backend
def test_backend(vgg):
  model, variables = vgg["model"], vgg["variables"]
  assert "slalom" in bk.available_backends()
  be = bk.make_backend("slalom", model, key=jax.random.key(7), batch_size=B)
  batch = {"image": vgg["images"], "label": np.argmax(vgg["logits"], -1).astype(np.int32),
           "mask": np.ones((B,), np.float32)}
  with pytest.raises(NotImplementedError, match="inference-only"):
    be.grads(variables["params"], variables["batch_stats"], batch, 0)
  with be:
    m = be.evaluate(variables["params"], variables["batch_stats"], batch, 0)
    assert set(m) == {"loss_sum", "correct", "count"}
    assert float(m["count"]) == B
    be.evaluate(variables["params"], variables["batch_stats"], batch, 1)
    assert be.timing["calls"] == 2 and be.timing["untrusted_s"] > 0
  cpu = bk.make_backend("slalom", model, key=jax.random.key(8), batch_size=B,
                        untrusted_device="cpu", config=sl.SlalomConfig(bits=7))
  assert cpu.runner is None and cpu.config.bits == 7
  cpu.precompute(variables["params"], variables["batch_stats"], B)
  assert cpu.runner.pending(B) == 1 and cpu.runner._dev.platform == "cpu"
  with pytest.raises(TypeError, match="unknown options"):
    bk.make_backend("slalom", model, key=jax.random.key(7), batch_size=B, bits=8)


# ------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet18", "resnet20"])
def test_full_models_match_dense(name):
  model = get_model(name, num_classes=10, input_shape=(32, 32, 3), width=0.125)
  variables = _init(model, 8)
  images = np.random.default_rng(8).standard_normal((B, 32, 32, 3)).astype(np.float32)
  want, inputs = sl.reference_forward(variables, images, model=model)
  runner = sl.SlalomRunner(model, variables, sl.SlalomConfig(), jax.random.key(9))
  assert _rel(runner.infer(images), want) < _error_bound(model, variables, inputs, 8)


@pytest.mark.slow
def test_mnist_accuracy_matches_dense(tmp_path):
  """Issue 6: a trained MNIST-5k model (experiments/configs/mnist.py, dense, 2 epochs)
  reaches the same held-out accuracy through Slalom as dense, within 0.005."""
  from asymml_jax import data as data_lib
  from asymml_jax import train as train_lib
  from experiments.configs import mnist

  config = mnist.get_config()
  config.backend, config.num_epochs = "dense", 2.0
  train_lib.train_and_evaluate(config, str(tmp_path), log=lambda msg: None)
  ds = data_lib.load_dataset("mnist5k")
  acc = {}
  for backend in ("dense", "slalom"):
    config.backend = backend
    acc[backend] = train_lib.evaluate_checkpoint(config, str(tmp_path), dataset=ds,
                                                 log=lambda msg: None)["accuracy"]
  print(f"MNIST-5k held-out accuracy: dense {acc['dense']:.4f}, slalom {acc['slalom']:.4f}")
  assert acc["dense"] > 0.9
  assert abs(acc["slalom"] - acc["dense"]) <= 0.005
