"""The central invariant, checked: every backend gives the dense model's loss and gradients.

With noise and clipping off, ``X_L + R = X`` exactly, so the split network
computes the dense network's function and gradients whatever ``U`` is
(DESIGN section 1); only float32 summation order differs.  :func:`compare`
runs one batch through each backend from the same parameters and reports the
relative L2 error ``||x - x_dense|| / ||x_dense||`` of the loss and of every
gradient leaf (the worst leaf is reported).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from asymml_jax import backends as bk
from asymml_jax import parallel, precision
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


FLOAT64_TOLERANCE = 1e-10  # relative; float64 rounding after ~100 layers is ~1e-13


def float32_floor(model: StagedModel, variables, batch, key: jax.Array,
                  ulp: float = 3e-7, seeds: int = 8) -> dict[str, Any]:
  """How far *dense itself* moves under float32-rounding-sized perturbations.

  Runs the dense model unperturbed, then once per seed with every convolution
  output multiplied by ``1 + ulp * u`` (``u`` uniform in [-1, 1], drawn from
  the seed), i.e. the size of a float32 rounding difference.  Any correct
  reimplementation that sums in another order (the split, another conv
  algorithm, another device) can differ from dense by this much; where a ReLU
  pre-activation lies within rounding distance of zero the difference is a
  whole element's gradient.  Which elements those are depends on the draw,
  so the floor is the maximum over ``seeds`` draws (``docs/design.md``,
  "Verification").

  Returns:
    ``{"rel_err_loss", "rel_err_grads", "worst_leaf"}`` of the worst draw, and
    ``per_seed`` (each draw's worst gradient error) and ``spread`` ``[min, max]``.
  """
  from asymml_jax import stages
  if seeds < 1:
    raise ValueError(f"the floor needs at least one seed, got {seeds}")
  plan = bk.make_plan_for("dense", model, int(batch["image"].shape[0]), DecompositionConfig())

  def loss(params, jitter, seed):
    def group(*args):
      out = stages.untrusted_group(*args)
      return {n: y * (1.0 + jitter * jax.random.uniform(
          jax.random.fold_in(jax.random.key(seed), i), y.shape, y.dtype, -1.0, 1.0))
              for i, (n, y) in enumerate(sorted(out.items()))}
    hook = stages.InlineHook(model, plan, batch, stages.step_key(key, 0), True)
    return stages.run_untrusted(model, plan, params, variables["batch_stats"], hook,
                                group=group)[0]
  f = jax.jit(jax.value_and_grad(loss))
  l0, g0 = f(variables["params"], 0.0, 0)
  draws = []
  for seed in range(seeds):
    l1, g1 = f(variables["params"], ulp, seed)
    errs = tree_rel_errs(g1, g0)
    worst = max(errs, key=errs.get)
    draws.append((errs[worst], rel_err(l1, l0), worst))
  grads, loss_err, leaf = max(draws)
  per_seed = [d[0] for d in draws]
  return {"rel_err_loss": max(d[1] for d in draws), "rel_err_grads": grads,
          "worst_leaf": leaf, "per_seed": per_seed, "spread": [min(per_seed), max(per_seed)],
          "what": f"dense vs dense with conv outputs perturbed by {ulp:g} (float32 "
                  f"rounding), worst of {seeds} draws; differences below this are not "
                  "attributable to a backend"}


def random_batch(model: StagedModel, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A reproducible batch of standard-normal images and random labels."""
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch_size, *model.input_shape)).astype(np.float32),
          "label": rng.integers(0, model.num_classes, batch_size).astype(np.int32),
          "mask": np.ones((batch_size,), np.float32)}


def check_batch(model: StagedModel, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A user's ``{"image", "label"}`` batch, checked, as float32 images and int32 labels.

  Images are rounded to float32 (the sealed format), so every backend, in
  either precision, starts from the same values.
  """
  if "image" not in batch or "label" not in batch:
    raise ValueError(f"a batch needs 'image' and 'label', got keys {sorted(batch)}")
  image = np.asarray(batch["image"])
  model.check_input(image)
  if not np.all(np.isfinite(image)):
    raise ValueError("the batch's images contain NaN or Inf")
  label = np.asarray(batch["label"])
  if label.shape != image.shape[:1] or label.dtype.kind not in "iu":
    raise ValueError(f"labels must be {image.shape[:1]} integers, got {label.dtype} "
                     f"{label.shape}")
  if label.min() < 0 or label.max() >= model.num_classes:
    raise ValueError(f"labels must lie in [0, {model.num_classes}), got "
                     f"[{label.min()}, {label.max()}]")
  return {"image": image.astype(np.float32), "label": label.astype(np.int32),
          "mask": np.ones(label.shape, np.float32)}


def batch_from_folder(path: str, size: int, count: int) -> tuple[dict, int]:
  """The first ``count`` images of an image folder (:func:`asymml_jax.data.load_image_folder`).

  Returns:
    ``(batch, num_classes)``; the images come in the folder's train-then-test
    order, normalised as :func:`~asymml_jax.data.load_image_folder` does.
  """
  from asymml_jax import data
  ds = data.load_image_folder(path, image_size=(size, size))
  images = np.concatenate([ds.train_images, ds.test_images])
  labels = np.concatenate([ds.train_labels, ds.test_labels])
  return _first(images, labels, count, path), ds.num_classes


def batch_from_npz(path: str, count: int) -> tuple[dict, int]:
  """The first ``count`` examples of an ``.npz`` with ``image`` (``(N, H, W, C)``) and ``label``.

  Returns:
    ``(batch, num_classes)`` with ``num_classes = max(10, max label + 1)``.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--npz: {path} does not exist")
  with np.load(path, allow_pickle=False) as f:
    missing = {"image", "label"} - set(f.files)
    if missing:
      raise ValueError(f"{path} needs arrays 'image' and 'label'; it has {sorted(f.files)}")
    images, labels = f["image"], f["label"]
  if images.ndim != 4:
    raise ValueError(f"{path}: 'image' must be (N, H, W, C), got shape {images.shape}")
  if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu" or labels.min() < 0:
    raise ValueError(f"{path}: 'label' must be {images.shape[:1]} non-negative integers, "
                     f"got {labels.dtype} {labels.shape}")
  return _first(images, labels, count, path), max(10, int(labels.max()) + 1)


def _first(images, labels, count: int, path: str) -> dict:
  if not 1 <= count <= len(labels):
    raise ValueError(f"{path} holds {len(labels)} examples; a batch of {count} needs "
                     f"between 1 and {len(labels)}")
  return {"image": np.asarray(images[:count], np.float32),
          "label": np.asarray(labels[:count], np.int32)}


def compare(model: StagedModel, backend_names: Sequence[str], *, batch_size: int = 4,
            decomposition: DecompositionConfig = DecompositionConfig(),
            seed: int = 0, force: str | None = None,
            backend_options: Mapping[str, Mapping[str, Any]] | None = None,
            prepare: Callable[[str, Mapping[str, Any]], Mapping[str, Any]] | None = None,
            floor: bool = True, gradient_protection: str = "decompose",
            mesh: Mesh | None = None, dtype: str = "float32",
            batch: Mapping[str, Any] | None = None, floor_seeds: int = 8) -> dict[str, Any]:
  """Runs one batch through ``dense`` and every listed backend and compares.

  The reference is always ``dense`` on one device (no mesh).  With ``mesh``
  every listed backend (``dense`` too, when listed) runs data-parallel on it
  (DESIGN section 10), so the comparison also checks the sharded step.

  Args:
    model: the staged model.
    backend_names: backends to check (``dense`` is always the reference).
    batch_size: samples in the random batch (ignored when ``batch`` is given).
    decomposition: rank rule etc. (noise and clipping are off).
    seed: parameters, random batch and trusted key.
    force: optional plan override for the split backends (e.g. ``per_batch``).
    backend_options: per-backend factory options.
    prepare: ``prepare(name, batch) -> options`` for backends whose trusted side
      owns the data (``enclave``, ``tee_only``): it must make that side hold
      exactly ``batch``, in order (e.g. seal it); such backends get ``batch=None``.
    floor: also measure :func:`float32_floor` (float32 only).
    gradient_protection: ``decompose`` (only ``dY_R`` leaves; the TEE adds its
      shares) or ``none`` (the full ``dY`` leaves); noise stays off either way.
    mesh: optional :func:`asymml_jax.parallel.make_mesh` mesh for the listed
      backends; the batch size must split evenly over it.
    dtype: ``float32``, or ``float64``: every backend (and the enclave process)
      computes in float64 and the criterion is :data:`FLOAT64_TOLERANCE`.
    batch: the user's own ``{"image", "label"}`` batch (see :func:`check_batch`);
      default: :func:`random_batch`.
    floor_seeds: perturbation draws of the float32 floor.

  Returns:
    ``{"model", "dtype", "backends": [...], "max_rel_err_loss",
    "max_rel_err_grads", "tolerance", "passed", "num_devices"}``; each backend
    row also gives ``grad_devices``, the number of devices its gradients were
    returned on.
  """
  unknown = [n for n in backend_names if n not in bk.available_backends()]
  if unknown:  # before any compilation
    raise ValueError(f"unknown backend {unknown[0]!r}; choices: "
                     f"{', '.join(bk.available_backends())}")
  precision.check_dtype(dtype)
  batch = random_batch(model, batch_size, seed) if batch is None else check_batch(model, batch)
  batch_size = int(batch["image"].shape[0])
  parallel.check_batch_size(batch_size, mesh)
  if mesh is not None and "tee_only" in backend_names and parallel.num_devices(mesh) > 1:
    raise ValueError("tee_only runs everything in the enclave and cannot use a mesh of "
                     f"{parallel.num_devices(mesh)} devices; leave it out of the backends")
  with precision.computing_in(dtype):
    out = _compare(model, list(dict.fromkeys(backend_names)), batch, seed, mesh, prepare,
                   dict(backend_options or {}), floor and dtype == "float32", floor_seeds,
                   dict(decomposition=decomposition, force=force,
                        privacy=PrivacyConfig(gradient_protection=gradient_protection)))
  fl = out.get("float32_floor")
  tolerance = (FLOAT64_TOLERANCE if dtype == "float64" else
               max(1e-4, 2 * fl["rel_err_grads"]) if fl else 1e-4)
  return {**out, "model": model.name, "input_shape": list(model.input_shape),
          "batch_size": batch_size, "dtype": dtype,
          "gradient_protection": gradient_protection,
          "num_devices": parallel.num_devices(mesh), "tolerance": tolerance,
          "passed": max(out["max_rel_err_loss"], out["max_rel_err_grads"]) <= tolerance}


def _compare(model, names, batch, seed, mesh, prepare, options, floor, floor_seeds,
             settings) -> dict[str, Any]:
  """:func:`compare` inside its precision: run every backend, then the rows."""
  init_key, trusted_key = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key)
  batch_size = int(batch["image"].shape[0])
  compute_batch = precision.cast_floats(batch)

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
                         decomposition=settings["decomposition"], privacy=settings["privacy"],
                         force=None if name == "dense" else settings["force"],
                         **opts) as backend:
      t0 = time.perf_counter()
      loss, grads, _, _ = backend.grads(variables["params"], variables["batch_stats"],
                                        None if owns_data else compute_batch, 0)
      devices = min(len(leaf.sharding.device_set) if isinstance(leaf, jax.Array) else 1
                    for leaf in jax.tree_util.tree_leaves(grads))
      grads = jax.device_get(grads)
      return (float(loss), grads, time.perf_counter() - t0,
              {s: p.mode for s, p in backend.plan.sites.items()}, devices)

  reference = run("dense", None)  # single-device dense
  results = {name: reference if name == "dense" and mesh is None else run(name, mesh)
             for name in names}
  rows = [_row(name, *results[name], reference) for name in names]
  out: dict[str, Any] = {}
  if floor:
    out["float32_floor"] = float32_floor(model, variables, compute_batch, trusted_key,
                                         seeds=floor_seeds)
  return {**out, "backends": rows,
          "max_rel_err_loss": max((r["rel_err_loss"] for r in rows), default=0.0),
          "max_rel_err_grads": max((r["rel_err_grads"] for r in rows), default=0.0)}


def _row(name, loss, grads, seconds, modes, devices, reference) -> dict[str, Any]:
  errs = tree_rel_errs(grads, reference[1])
  worst = max(errs, key=errs.get)
  return {"name": name, "loss": loss, "rel_err_loss": rel_err(loss, reference[0]),
          "rel_err_grads": errs[worst], "worst_leaf": worst,
          "seconds_with_compile": seconds, "grad_devices": devices,
          "modes": sorted(set(modes.values()))}
