"""Freivalds checks of the accelerator's convolutions (asymml_jax.integrity, issue 6).

Statistical part: 10,000 vectorised trials per direction on a tiny convolution,
each with fresh data (magnitudes over six decades), fresh secret signs, and a
result computed several correct ways (XLA's convolution, an explicit im2col
matmul, a per-channel sum in another order, float64 rounded to float32,
bfloat16 inputs and outputs) plus one tampered result.  Model part: the checks
wired into the trusted stages (``verify_untrusted``) change no number and turn
a tampering accelerator into :class:`asymml_jax.integrity.IntegrityError`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asymml_jax import integrity, layers, ops, verify
from asymml_jax import stages as st
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.executor import TrustedExecutor
from asymml_jax.models.base import InputStage, StagedModel
from asymml_jax.plan import make_plan
from asymml_jax.privacy.config import PrivacyConfig

B, H, W, C, K = 2, 6, 6, 3, 4
SPECS = {
    "3x3": ops.ConvSpec(name="t", site="t", in_features=C, features=K),
    # strided, non-square kernel, asymmetric padding: uncovered pixels in conv^T
    "strided": ops.ConvSpec(name="t", site="t", in_features=C, features=K,
                            kernel_size=(3, 2), strides=(2, 2), padding=((0, 1), (1, 0))),
}
TRIALS = {"3x3": 10_000, "strided": 2_000}
HIGHEST = jax.lax.Precision.HIGHEST
BF16 = jnp.bfloat16


# ------------------------------------------------------- float64 references
def _windows(x, spec, ho, wo):
  """``(N, B, Ho, Wo, kh, kw, C)`` input windows of a padded float64 batch of batches."""
  (pt, pb), (pl, pr) = spec.padding
  (kh, kw), (sh, sw) = spec.kernel_size, spec.strides
  xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = np.empty((*x.shape[:2], ho, wo, kh, kw, x.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out[:, :, :, :, i, j] = xp[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw]
  return out


def _conv64(r, w, spec):
  """``conv(R, W)`` in float64 for ``r (N, B, H, W, C)``, ``w (N, kh, kw, C, K)``."""
  n, b = r.shape[:2]
  ho, wo = spec.output_hw(*r.shape[2:4])
  cols = _windows(np.asarray(r, np.float64), spec, ho, wo).reshape(n, b * ho * wo, -1)
  y = cols @ np.asarray(w, np.float64).reshape(n, -1, w.shape[-1])
  return y.reshape(n, b, ho, wo, -1)


def _conv_t64(dy, w, spec, hw):
  """``conv^T(dY, W)`` in float64 (the exact transpose of :func:`_conv64`)."""
  n, b, ho, wo, k = dy.shape
  (pt, pb), (pl, pr) = spec.padding
  (kh, kw), (sh, sw) = spec.kernel_size, spec.strides
  w64 = np.asarray(w, np.float64).reshape(n, -1, k)
  cols = (np.asarray(dy, np.float64).reshape(n, -1, k) @ w64.transpose(0, 2, 1))
  cols = cols.reshape(n, b, ho, wo, kh, kw, -1)
  gp = np.zeros((n, b, hw[0] + pt + pb, hw[1] + pl + pr, cols.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      gp[:, :, i:i + sh * ho:sh, j:j + sw * wo:sw] += cols[:, :, :, :, i, j]
  return gp[:, :, pt:pt + hw[0], pl:pl + hw[1]]


# ------------------------------------------------ correct float32 algorithms
def _im2col(r, w, spec):
  kh, kw = spec.kernel_size
  pat = jax.lax.conv_general_dilated_patches(
      r, (kh, kw), spec.strides, spec.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=HIGHEST)
  pat = pat.reshape(*pat.shape[:3], r.shape[-1], kh, kw)  # channel-major patches
  return jnp.einsum("bhwcij,ijco->bhwo", pat, w, precision=HIGHEST)


def _per_channel(r, w, spec):
  """Sum of one-input-channel convolutions: another summation order."""
  out = 0.0
  for c in range(r.shape[-1]):
    out = out + ops.conv(r[..., c:c + 1], w[:, :, c:c + 1, :], spec.strides, spec.padding)
  return out


def _transpose_of(f, spec, hw):
  def g(dy, w):
    zeros = jnp.zeros((dy.shape[0], *hw, w.shape[2]), dy.dtype)
    return jax.vjp(lambda x: f(x, w.astype(dy.dtype), spec), zeros)[1](dy)[0]
  return g


def _data(seed, spec, n):
  """``n`` trials of data (numpy: no RNG to compile), magnitudes over six decades.

  Half the trials are ReLU-like (non-negative with a shift: many equal entries).
  Also one random element per trial to tamper with: its indices and the signed
  factor ``f`` in ``(1, 3)`` (times the tolerance at its pixel).
  """
  rng = np.random.default_rng(seed)
  scale = 10.0 ** rng.uniform(-3.0, 3.0, (n, 1, 1, 1, 1))
  r = rng.standard_normal((n, B, H, W, C)) * scale
  relu = rng.random((n, 1, 1, 1, 1)) < 0.5
  r = np.where(relu, np.maximum(r, 0.0) - 0.1 * scale, r)
  kh, kw = spec.kernel_size
  w = rng.standard_normal((n, kh, kw, C, K)) / np.sqrt(kh * kw * C)
  ho, wo = spec.output_hw(H, W)
  dy = rng.standard_normal((n, B, ho, wo, K)) * scale * 1e-3

  def where(shape):
    return {"b": rng.integers(0, B, n), "i": rng.integers(0, shape[0], n),
            "j": rng.integers(0, shape[1], n), "o": rng.integers(0, shape[2], n),
            "f": rng.choice([-1.0, 1.0], n) * (1.0 + 2.0 ** -10 + 2.0 * rng.random(n))}

  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (f32(r), f32(w), f32(dy), jax.tree.map(jnp.asarray, where((ho, wo, K))),
          jax.tree.map(jnp.asarray, where((H, W, C))))


def _tamper(x, tolerance, at, scale=1.0):
  """Adds ``f * scale * tolerance[pixel]`` to element ``at`` of ``x``."""
  delta = at["f"] * scale * tolerance[at["i"], at["j"]]
  return x.at[at["b"], at["i"], at["j"], at["o"]].add(delta.astype(x.dtype))


def _verdicts(combine, a, c, rhs, bound, honest, tampered_of):
  worst = {n: integrity.compare(combine(v, a, c), rhs, bound).worst for n, v in honest.items()}
  caught = {n: ~integrity.compare(combine(v, a, c), rhs, bound).ok
            for n, v in tampered_of(integrity.element_tolerance(bound)).items()}
  return worst, caught


def _forward_trial(key, r, w, y64, at, spec):
  """One trial: correct results (several algorithms) and tampered ones, checked."""
  a, c = integrity.coefficients(key, B, K)
  y = ops.untrusted_conv(r, w, spec)
  honest = {"xla": y, "im2col": _im2col(r, w, spec), "per_channel": _per_channel(r, w, spec),
            "float64": y64}
  rhs, bound = integrity.conv_reference(r, w, spec, a, c)
  worst, caught = _verdicts(integrity.conv_combination, a, c, rhs, bound, honest, lambda tol: {
      "tolerance": _tamper(y, tol, at), "1.05 bound": _tamper(y, tol, at, 0.525)})
  # bfloat16 residuals: the accelerator rounds R and W and its result
  y16 = ops.untrusted_conv(r.astype(BF16), w, spec)
  rhs16, bound16 = integrity.conv_reference(r, w, spec, a, c, BF16)
  w16, c16 = _verdicts(integrity.conv_combination, a, c, rhs16, bound16, {"bfloat16": y16},
                       lambda tol: {"bfloat16": _tamper(y16, tol, at)})
  return {"worst": {**worst, **w16}, "caught": {**caught, **c16}}


def _backward_trial(key, dy, w, g64, at, spec):
  hw = (H, W)
  a, d = integrity.coefficients(key, B, C)
  g = _transpose_of(ops.untrusted_conv, spec, hw)(dy, w)
  honest = {"autodiff": g, "im2col": _transpose_of(_im2col, spec, hw)(dy, w),
            "per_channel": _transpose_of(_per_channel, spec, hw)(dy, w), "float64": g64}
  rhs, bound = integrity.transposed_reference(dy, w, spec, a, d, hw)
  worst, caught = _verdicts(integrity.transposed_combination, a, d, rhs, bound, honest,
                            lambda tol: {"tolerance": _tamper(g, tol, at),
                                         "1.05 bound": _tamper(g, tol, at, 0.525)})
  g16 = _transpose_of(ops.untrusted_conv, spec, hw)(dy.astype(BF16), w)
  rhs16, bound16 = integrity.transposed_reference(dy, w, spec, a, d, hw, BF16)
  w16, c16 = _verdicts(integrity.transposed_combination, a, d, rhs16, bound16,
                       {"bfloat16": g16}, lambda tol: {"bfloat16": _tamper(g16, tol, at)})
  return {"worst": {**worst, **w16}, "caught": {**caught, **c16}}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("geometry", list(SPECS))
def test_freivalds_catches_every_single_element_change_and_accepts_correct_results(
    geometry, direction):
  """Acceptance 4: >= 9,999 of 10,000 tampered results caught; no correct one rejected."""
  spec, n = SPECS[geometry], TRIALS[geometry]
  r, w, dy, at_out, at_in = _data(list(SPECS).index(geometry), spec, n)
  keys = jax.random.split(jax.random.key(2024), n)
  if direction == "forward":
    ref = jnp.asarray(_conv64(np.asarray(r), np.asarray(w), spec), jnp.float32)
    trial, x, at = _forward_trial, r, at_out
  else:
    ref = jnp.asarray(_conv_t64(np.asarray(dy), np.asarray(w), spec, (H, W)), jnp.float32)
    trial, x, at = _backward_trial, dy, at_in
  out = jax.device_get(jax.jit(jax.vmap(functools.partial(trial, spec=spec)))(
      keys, x, w, ref, at))
  worst = {name: float(np.max(v)) for name, v in out["worst"].items()}
  # Correct float32 results never fail, with a wide margin: the bound is a
  # worst case (~50x above what they show); bfloat16 ones stay below half of it
  # (their output rounding is bounded by u_io M_p, the bound allows 2 u_io M_p).
  assert all(v <= 0.1 for k, v in worst.items() if k != "bfloat16"), worst
  assert worst["bfloat16"] <= 0.5, worst
  # A change by more than the tolerance (twice the bound) is caught every time
  # (required: >= 9,999 of 10,000; Rademacher signs make it certain), and in
  # practice already a change by more than 1.05 bounds.
  caught = {name: int(np.sum(v)) for name, v in out["caught"].items()}
  assert caught == dict.fromkeys(caught, n), caught


def test_check_is_cheap_and_parameters_are_validated():
  spec = ops.ConvSpec(name="c", site="s", in_features=64, features=64)
  m = integrity.check_macs(spec, batch=32, h=32, w=32)
  assert m["conv"] == 32 * 32 * 32 * 9 * 64 * 64
  assert m["forward"] < 0.01 * m["conv"] and m["backward"] < 0.01 * m["conv"]
  assert integrity.check_macs(spec, 32, 32, 32, repetitions=2)["forward"] > m["forward"]
  with pytest.raises(ValueError, match="repetitions"):
    integrity.coefficients(jax.random.key(0), 2, 3, repetitions=0)
  with pytest.raises(ValueError, match="verify_untrusted"):
    DecompositionConfig(verify_untrusted="yes")
  # eps grows with the dot-product length; bfloat16 results add their rounding
  assert integrity.error_factor(27, 2, 4) < integrity.error_factor(576, 2, 4)
  assert integrity.error_factor(27, 2, 4, BF16) > 2 ** -8


def test_enforce_raises_a_typed_error_naming_the_layer_also_for_non_finite_results():
  spec = SPECS["3x3"]
  r, w, *_ = _data(0, spec, 1)
  r, w = r[0], w[0]

  @jax.jit
  def stage(y):
    integrity.enforce({"c9": integrity.check_conv(y, r, w, spec, jax.random.key(1))},
                      stage=3, direction="forward", labels={"c9": "conv 'c9'"})
    return y * 2

  y = ops.untrusted_conv(r, w, spec)
  with integrity.typed_errors():
    jax.block_until_ready(stage(y))  # a correct result passes
  with pytest.raises(integrity.IntegrityError,
                     match=r"stage 3 \(forward\).*conv 'c9' \(discrepancy nanx.*rejected"):
    with integrity.typed_errors():
      jax.block_until_ready(stage(y.at[0, 0, 0, 0].set(jnp.nan)))


def test_integrity_keys_are_their_own_stream():
  key = jax.random.key(3)
  keys = [st.site_key(key, 0), st.release_noise_key(key, 0), st.gradient_key(key, 0),
          st.integrity_key(key, 0, "forward"), st.integrity_key(key, 0, "backward"),
          st.integrity_key(key, 1, "forward"), st.integrity_key(key, 1, "backward")]
  data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}
  assert len(data) == len(keys)


# ------------------------------------------------------------------ a model
class _Mid(nn.Module):
  @nn.compact
  def __call__(self, ys, carry, train):
    return {"s1": nn.relu(ys["c0"])}, carry


class _Head(nn.Module):
  @nn.compact
  def __call__(self, ys, carry, train):
    h = nn.relu(ys["c1"] + ys["c2"])
    return {"logits": nn.Dense(3, precision=HIGHEST)(layers.global_avg_pool(h))}, carry


def _tiny_model() -> StagedModel:
  """Input site -> c0 -> BN/ReLU -> site s1 read by two strided convs -> head."""
  g0 = (ops.ConvSpec(name="c0", site="s0", in_features=3, features=8),)
  g1 = (ops.ConvSpec(name="c1", site="s1", in_features=8, features=6, strides=(2, 2)),
        ops.ConvSpec(name="c2", site="s1", in_features=8, features=6, kernel_size=(1, 1),
                     strides=(2, 2), padding=((0, 0), (0, 0))))
  return StagedModel(name="tiny", input_shape=(8, 8, 3), num_classes=3,
                     stages=(InputStage(site="s0"), _Mid(), _Head()), groups=(g0, g1))


@jax.custom_vjp
def _bad_gradient(r, delta):
  del delta
  return r


_bad_gradient.defvjp(lambda r, delta: (r, delta),
                     lambda delta, g: (g.at[2, 3, 1, 5].add(delta), None))


def _tampering_group(delta_fwd, delta_bwd):
  """The accelerator's group, one element of ``c1``'s output and of ``s1``'s gradient changed."""
  def group(model, plan, k, conv_params, rs, residual_dtype=None):
    rs = {s: _bad_gradient(r, delta_bwd) if s == "s1" else r for s, r in rs.items()}
    out = st.untrusted_group(model, plan, k, conv_params, rs, residual_dtype)
    if "c1" in out:
      out["c1"] = out["c1"].at[1, 1, 2, 3].add(delta_fwd.astype(out["c1"].dtype))
    return out
  return group


@pytest.fixture(scope="module")
def tiny():
  model = _tiny_model()
  # Random weights of the right shapes without compiling the initialisers.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype),
                           jax.eval_shape(model.init, jax.random.key(0)))
  batch = verify.random_batch(model, 3)

  def plan(verify_untrusted, gradient_protection="decompose"):
    cfg = DecompositionConfig(rank_fraction=0.34, tau=0.0, num_iters=1,
                              verify_untrusted=verify_untrusted)
    return make_plan(model, 3, cfg, force="per_sample",
                     privacy=PrivacyConfig(gradient_protection=gradient_protection))

  return model, variables, batch, plan


def _step(model, plan, variables, batch):
  def loss(params, d_fwd, d_bwd):
    hook = st.InlineHook(model, plan, batch, st.step_key(jax.random.key(1), 0), True)
    return st.run_untrusted(model, plan, params, variables["batch_stats"], hook,
                            group=_tampering_group(d_fwd, d_bwd))[0]
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.fault("tampered_result")
def test_verified_train_step_equals_unverified_and_rejects_a_tampering_accelerator(tiny):
  model, variables, batch, plan = tiny
  zero = jnp.float32(0.0)
  plain, checked = plan(False), plan(True)
  assert {s.mode for s in checked.sites.values()} == {"per_sample"} and checked.verify_untrusted
  l0, g0 = _step(model, plain, variables, batch)(variables["params"], zero, zero)
  step = _step(model, checked, variables, batch)
  with integrity.typed_errors():
    l1, g1 = jax.block_until_ready(step(variables["params"], zero, zero))
  # The checks only read: same loss and gradients (float32 rounding of fusion choices).
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  assert max(verify.tree_rel_errs(g1, g0).values()) <= 1e-5
  with pytest.raises(integrity.IntegrityError,
                     match=r"stage 2 \(forward\).*conv\(R, W\).*conv 'c1'"):
    with integrity.typed_errors():
      jax.block_until_ready(step(variables["params"], jnp.float32(0.5), zero))
  backward = r"stage 1 \(backward\).*residual gradient.*site 's1' \(read by c1, c2\)"
  with pytest.raises(integrity.IntegrityError, match=backward):
    with integrity.typed_errors():
      jax.block_until_ready(step(variables["params"], zero, jnp.float32(0.05)))
  # Off, nothing is checked: no callback, no probe in the program.
  text = str(jax.make_jaxpr(lambda p: _step(model, plain, variables, batch)(p, zero, zero))(
      variables["params"]))
  assert "callback" not in text


def test_executor_raises_integrity_errors_for_tampered_inputs(tiny):
  """The path of the local and enclave backends: the trusted executor itself refuses."""
  model, variables, batch, plan = tiny
  # Without gradient protection the accelerator gets the full dY (the other
  # configuration); c0 fully trusted (smaller programs); s1 split, read by c1 and c2.
  p = plan(True, gradient_protection="none")
  p = dataclasses.replace(p, sites={**p.sites, "s0": dataclasses.replace(p.sites["s0"],
                                                                        mode="trusted")})
  ex = TrustedExecutor(model, p, jax.random.key(5))
  params, stats = variables["params"], variables["batch_stats"]
  ex.begin(0, batch, train=True)
  rs, *_ = ex.forward(0, 0, {}, st.stage_params(model, params, 0), st.stage_stats(stats, 0))
  yr = st.untrusted_group(model, p, 0, params["convs"], rs)
  rs1, *_ = ex.forward(0, 1, yr, st.stage_params(model, params, 1), st.stage_stats(stats, 1))
  group = lambda cp, r: st.untrusted_group(model, p, 1, cp, r)
  yr2, vjp = jax.vjp(group, params["convs"], rs1)
  bad = {**yr2, "c2": yr2["c2"].at[0, 0, 0, 0].add(1.0)}
  with pytest.raises(integrity.IntegrityError, match=r"conv 'c2'"):
    ex.forward(0, 2, bad, st.stage_params(model, params, 2), st.stage_stats(stats, 2))
  ex.forward(0, 2, yr2, st.stage_params(model, params, 2), st.stage_stats(stats, 2))
  dyr, _ = ex.backward(0, 2, {}, 1.0)
  _, drs = vjp(dyr)
  tampered = {"s1": drs["s1"].at[1, 2, 3, 4].add(jnp.max(jnp.abs(drs["s1"])))}
  with pytest.raises(integrity.IntegrityError, match=r"site 's1'"):
    ex.backward(0, 1, tampered, 0.0)


@pytest.mark.fault("tampered_result")
def test_enclave_turns_an_integrity_error_into_a_typed_protocol_error(monkeypatch):
  from enclave_bridge import protocol as pr
  from enclave_bridge.server import EnclaveServer

  server = EnclaveServer(dataset=None, seal_key=b"k" * 32)

  def refuse(msg):
    raise integrity.IntegrityError("integrity check failed in trusted stage 2 (forward)")

  monkeypatch.setattr(server, "_on_shutdown", refuse)
  reply = pr.decode(server.handle(pr.encode(pr.Message(pr.Op.SHUTDOWN, 0, 0, 0, {}, ()))))
  assert reply.op == pr.Op.ERROR and reply.meta["code"] == "integrity"
  with pytest.raises(pr.IntegrityViolation, match=r"stage 2 \(forward\)"):
    pr.raise_error(reply)
