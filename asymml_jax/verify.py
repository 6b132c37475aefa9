"""The central invariant, checked: every backend gives the dense model's loss and gradients.

With noise and clipping off, ``X_L + R = X`` exactly, so the split network
computes the dense network's function and gradients whatever ``U`` is
(DESIGN section 1); only float32 summation order differs.  :func:`compare`
runs one batch through each backend from the same parameters and reports the
relative L2 error ``||x - x_dense|| / ||x_dense||`` of the loss and of every
gradient leaf (the worst leaf is reported).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from asymml_jax import backends as bk
from asymml_jax import parallel
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models.base import StagedModel
from asymml_jax.privacy.config import PrivacyConfig


def rel_err(x, ref) -> float:
  """``||x - ref||_2 / ||ref||_2`` (absolute error where ``ref`` is exactly zero)."""
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  den = np.linalg.norm(ref)
  num = np.linalg.norm(x - ref)
  return float(num / den) if den > 0 else float(num)


def tree_rel_errs(tree, ref) -> dict[str, float]:
  """Relative error of every leaf, keyed by its path."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  ref_flat, _ = jax.tree_util.tree_flatten_with_path(ref)
  if [p for p, _ in flat] != [p for p, _ in ref_flat]:
    raise ValueError("gradient trees differ in structure")
  return {jax.tree_util.keystr(p): rel_err(a, b)
          for (p, a), (_, b) in zip(flat, ref_flat)}


def float32_floor(model: StagedModel, variables, batch, key: jax.Array,
                  ulp: float = 3e-7) -> tuple[float, float, str]:
  """How far *dense itself* moves under float32-rounding-sized perturbations.

  Runs the dense model twice, the second time with every convolution output
  multiplied by ``1 + ulp * u`` (``u`` uniform in [-1, 1], fixed), i.e. the
  size of a float32 rounding difference.  Any correct reimplementation that
  sums in another order (the split, another conv algorithm, another device)
  can differ from dense by this much; where a ReLU pre-activation lies within
  rounding distance of zero the difference is a whole element's gradient.

  Returns:
    ``(rel_err_loss, rel_err_grads, worst_leaf)`` of the perturbed run.
  """
  from asymml_jax import stages
  plan = bk.make_plan_for("dense", model, int(batch["image"].shape[0]), DecompositionConfig())

  def loss(params, jitter):
    def group(*args):
      out = stages.untrusted_group(*args)
      return {n: y * (1.0 + jitter * jax.random.uniform(
          jax.random.fold_in(jax.random.key(7), i), y.shape, minval=-1.0, maxval=1.0))
              for i, (n, y) in enumerate(sorted(out.items()))}
    hook = stages.InlineHook(model, plan, batch, stages.step_key(key, 0), True)
    return stages.run_untrusted(model, plan, params, variables["batch_stats"], hook,
                                group=group)[0]
  f = jax.jit(jax.value_and_grad(loss))
  l0, g0 = f(variables["params"], 0.0)
  l1, g1 = f(variables["params"], ulp)
  errs = tree_rel_errs(g1, g0)
  worst = max(errs, key=errs.get)
  return rel_err(l1, l0), errs[worst], worst


def random_batch(model: StagedModel, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A reproducible batch of standard-normal images and random labels."""
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch_size, *model.input_shape)).astype(np.float32),
          "label": rng.integers(0, model.num_classes, batch_size).astype(np.int32),
          "mask": np.ones((batch_size,), np.float32)}


def compare(model: StagedModel, backend_names: Sequence[str], *, batch_size: int = 4,
            decomposition: DecompositionConfig = DecompositionConfig(),
            seed: int = 0, force: str | None = None,
            backend_options: Mapping[str, Mapping[str, Any]] | None = None,
            prepare: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None,
            floor: bool = True, gradient_protection: str = "decompose",
            mesh: Mesh | None = None) -> dict[str, Any]:
  """Runs one batch through ``dense`` and every listed backend and compares.

  The reference is always ``dense`` on one device (no mesh).  With ``mesh``
  every listed backend (``dense`` too, when listed) runs data-parallel on it
  (DESIGN section 10), so the comparison also checks the sharded step.

  Args:
    model: the staged model.
    backend_names: backends to check (``dense`` is always the reference).
    batch_size: samples in the batch.
    decomposition: rank rule etc. (noise and clipping are off).
    seed: parameters, batch and trusted key.
    force: optional plan override for the split backends (e.g. ``per_batch``).
    backend_options: per-backend factory options.
    floor: also measure :func:`float32_floor` (one more dense compilation).
    gradient_protection: ``decompose`` (only ``dY_R`` leaves; the TEE adds its
      shares) or ``none`` (the full ``dY`` leaves); noise stays off either way.
    prepare: ``prepare(name, batch) -> options`` for backends whose trusted side
      owns the data (``enclave``, ``tee_only``): it must make that side hold
      exactly ``batch`` (e.g. seal it); such backends get ``batch=None``.
    mesh: optional :func:`asymml_jax.parallel.make_mesh` mesh for the listed
      backends; ``batch_size`` must split evenly over it.

  Returns:
    ``{"model", "backends": [...], "max_rel_err_loss", "max_rel_err_grads",
    "num_devices"}``; each backend row also gives ``grad_devices``, the
    number of devices its gradients were returned on.
  """
  unknown = [n for n in backend_names if n not in bk.available_backends()]
  if unknown:  # before any compilation
    raise ValueError(f"unknown backend {unknown[0]!r}; choices: "
                     f"{', '.join(bk.available_backends())}")
  parallel.check_batch_size(batch_size, mesh)
  if mesh is not None and "tee_only" in backend_names and parallel.num_devices(mesh) > 1:
    raise ValueError("tee_only runs everything in the enclave and cannot use a mesh of "
                     f"{parallel.num_devices(mesh)} devices; leave it out of the backends")
  privacy = PrivacyConfig(gradient_protection=gradient_protection)
  key = jax.random.key(seed)
  init_key, trusted_key = jax.random.split(key)
  variables = model.init(init_key)
  batch = random_batch(model, batch_size, seed)
  results: dict[str, Any] = {}
  options = dict(backend_options or {})

  def run(name: str, on_mesh: Mesh | None):
    opts = dict(options.get(name, {}))
    owns_data = name in bk.PROCESS_BACKENDS
    if owns_data:
      if prepare is None:
        raise ValueError(f"backend {name!r} holds its own data: pass prepare=")
      opts.update(prepare(name, batch))
    if on_mesh is not None:
      opts["mesh"] = on_mesh
    with bk.make_backend(name, model, key=trusted_key, batch_size=batch_size,
                         decomposition=decomposition, privacy=privacy,
                         force=None if name == "dense" else force, **opts) as backend:
      t0 = time.perf_counter()
      loss, grads, _, _ = backend.grads(variables["params"], variables["batch_stats"],
                                        None if owns_data else batch, 0)
      devices = min(len(leaf.sharding.device_set) if isinstance(leaf, jax.Array) else 1
                    for leaf in jax.tree_util.tree_leaves(grads))
      grads = jax.device_get(grads)
      return (float(loss), grads, time.perf_counter() - t0,
              {s: p.mode for s, p in backend.plan.sites.items()}, devices)

  reference = run("dense", None)  # single-device dense
  names = list(dict.fromkeys(backend_names))
  for name in names:
    results[name] = reference if name == "dense" and mesh is None else run(name, mesh)
  ref_loss, ref_grads = reference[0], reference[1]
  rows = []
  for name in names:
    loss, grads, seconds, modes, devices = results[name]
    errs = tree_rel_errs(grads, ref_grads)
    worst = max(errs, key=errs.get)
    rows.append({"name": name, "loss": loss, "rel_err_loss": rel_err(loss, ref_loss),
                 "rel_err_grads": errs[worst], "worst_leaf": worst,
                 "seconds_with_compile": seconds, "grad_devices": devices,
                 "modes": sorted(set(modes.values()))})
  out: dict[str, Any] = {}
  if floor:
    floor_loss, floor_grads, floor_leaf = float32_floor(model, variables, batch, trusted_key)
    out["float32_floor"] = {
        "rel_err_loss": floor_loss, "rel_err_grads": floor_grads, "worst_leaf": floor_leaf,
        "what": "dense vs dense with conv outputs perturbed by 3e-7 (float32 rounding); "
                "differences below this are not attributable to a backend"}
  return {
      **out,
      "model": model.name,
      "input_shape": list(model.input_shape),
      "batch_size": batch_size,
      "gradient_protection": gradient_protection,
      "num_devices": parallel.num_devices(mesh),
      "backends": rows,
      "max_rel_err_loss": max((r["rel_err_loss"] for r in rows), default=0.0),
      "max_rel_err_grads": max((r["rel_err_grads"] for r in rows), default=0.0),
  }
