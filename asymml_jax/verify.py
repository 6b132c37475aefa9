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

from asymml_jax import backends as bk
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models.base import StagedModel


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
            prepare: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None
            ) -> dict[str, Any]:
  """Runs one batch through ``dense`` and every listed backend and compares.

  Args:
    model: the staged model.
    backend_names: backends to check (``dense`` is always the reference).
    batch_size: samples in the batch.
    decomposition: rank rule etc. (noise and clipping are off).
    seed: parameters, batch and trusted key.
    force: optional plan override for the split backends (e.g. ``per_batch``).
    backend_options: per-backend factory options.
    prepare: ``prepare(name, batch) -> options`` for backends whose trusted side
      owns the data (``enclave``, ``tee_only``): it must make that side hold
      exactly ``batch`` (e.g. seal it); such backends get ``batch=None``.

  Returns:
    ``{"model", "backends": [...], "max_rel_err_loss", "max_rel_err_grads"}``.
  """
  key = jax.random.key(seed)
  init_key, trusted_key = jax.random.split(key)
  variables = model.init(init_key)
  batch = random_batch(model, batch_size, seed)
  results: dict[str, Any] = {}
  names = ["dense"] + [n for n in backend_names if n != "dense"]
  options = dict(backend_options or {})
  for name in names:
    opts = dict(options.get(name, {}))
    owns_data = name in bk.PROCESS_BACKENDS
    if owns_data:
      if prepare is None:
        raise ValueError(f"backend {name!r} holds its own data: pass prepare=")
      opts.update(prepare(name, batch))
    with bk.make_backend(name, model, key=trusted_key, batch_size=batch_size,
                         decomposition=decomposition,
                         force=None if name == "dense" else force, **opts) as backend:
      t0 = time.perf_counter()
      loss, grads, _, _ = backend.grads(variables["params"], variables["batch_stats"],
                                        None if owns_data else batch, 0)
      grads = jax.device_get(grads)
      results[name] = (float(loss), grads, time.perf_counter() - t0,
                       {s: p.mode for s, p in backend.plan.sites.items()})
  ref_loss, ref_grads, _, _ = results["dense"]
  rows = []
  for name in names:
    if name == "dense" and "dense" not in backend_names:
      continue
    loss, grads, seconds, modes = results[name]
    errs = tree_rel_errs(grads, ref_grads)
    worst = max(errs, key=errs.get)
    rows.append({"name": name, "loss": loss, "rel_err_loss": rel_err(loss, ref_loss),
                 "rel_err_grads": errs[worst], "worst_leaf": worst,
                 "seconds_with_compile": seconds,
                 "modes": sorted(set(modes.values()))})
  return {
      "model": model.name,
      "input_shape": list(model.input_shape),
      "batch_size": batch_size,
      "backends": rows,
      "max_rel_err_loss": max((r["rel_err_loss"] for r in rows), default=0.0),
      "max_rel_err_grads": max((r["rel_err_grads"] for r in rows), default=0.0),
  }
