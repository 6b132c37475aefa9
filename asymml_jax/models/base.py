"""The staged-model representation shared by every backend (DESIGN sections 3 and 5).

A convolutional network is written once as an alternation of

* trusted stages ``S_0 .. S_n`` (linen modules: normalisation, ReLU, pooling,
  shortcut additions, the classifier head), each mapping the full outputs
  ``ys`` of the previous convolutions and a private ``carry`` (e.g. a shortcut)
  to the activations ``xs`` that the next convolutions read, keyed by *site*;
* groups of convolutions ``G_0 .. G_{n-1}`` (:class:`asymml_jax.ops.ConvSpec`),
  ``G_k`` reading the sites produced by ``S_k`` and feeding ``S_{k+1}``.

``S_0`` receives the image in ``carry['image']``; ``S_n`` returns
``{'logits': ...}``.  The backends (``backends.py``) decide where each piece
runs: every convolution may be split into a trusted low-rank half and an
untrusted residual half, or run fully trusted, or (``dense``) fully untrusted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from asymml_jax import layers, precision
from asymml_jax.ops import ConvSpec

MIN_INPUT_SIZE = 32


class InputStage(nn.Module):
  """``S_0``: hands the (already normalised) image to the first site."""

  site: str = "input"

  @nn.compact
  def __call__(self, ys: Mapping[str, jax.Array], carry: Mapping[str, jax.Array],
               train: bool):
    del ys, train
    return {self.site: carry["image"]}, {}


@dataclasses.dataclass(frozen=True, eq=False)
class StagedModel:
  """A network as trusted stages and convolution groups (see module docstring).

  Attributes:
    name: model name (``vgg11`` ...).
    input_shape: ``(H, W, C)`` of one image.
    num_classes: classifier outputs.
    stages: ``S_0 .. S_n``.
    groups: ``G_0 .. G_{n-1}``.
    norm: ``batch``, ``group`` or ``none`` (for the privacy validator).
    width: the channel multiplier it was built with (to rebuild it elsewhere).
  """

  name: str
  input_shape: tuple[int, int, int]
  num_classes: int
  stages: tuple[nn.Module, ...]
  groups: tuple[tuple[ConvSpec, ...], ...]
  norm: str = "batch"
  width: float = 1.0

  def __post_init__(self):
    if len(self.groups) != len(self.stages) - 1:
      raise ValueError("a staged model needs exactly one conv group between stages")
    names = [c.name for g in self.groups for c in g]
    if len(set(names)) != len(names):
      raise ValueError(f"conv names must be unique, got {names}")

  # ----------------------------------------------------------------- structure
  @property
  def num_stages(self) -> int:
    return len(self.stages)

  @functools.cached_property
  def convs(self) -> dict[str, ConvSpec]:
    return {c.name: c for g in self.groups for c in g}

  @functools.cached_property
  def site_order(self) -> tuple[str, ...]:
    """Sites in order of production; the index seeds each site's RNG key."""
    out: list[str] = []
    for g in self.groups:
      for c in g:
        if c.site not in out:
          out.append(c.site)
    return tuple(out)

  def conv_index(self, name: str) -> int:
    """Position of conv ``name`` in :attr:`convs` (seeds its gradient key)."""
    return list(self.convs).index(name)

  def consumers(self, site: str) -> tuple[ConvSpec, ...]:
    return tuple(c for g in self.groups for c in g if c.site == site)

  def check_input(self, images: Any) -> None:
    """Raises ``ValueError`` unless ``images`` is ``(B, H, W, C)`` of this model."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[1:] != tuple(self.input_shape):
      raise ValueError(
          f"{self.name} expects images of shape (B, {', '.join(map(str, self.input_shape))})"
          f" (B, H, W, C), got {shape}")
    if shape[0] < 1:
      raise ValueError("a batch needs at least one image")

  # ------------------------------------------------------------- abstract pass
  def _stage_init(self, k: int, key, ys, carry):
    return self.stages[k].init_with_output(key, ys, carry, False)

  @functools.cached_property
  def site_shapes(self) -> dict[str, tuple[int, int, int]]:
    """``(H, W, C)`` of every site, from an abstract pass (no FLOPs)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    carry = {"image": jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)}
    ys: dict = {}
    key = jax.random.key(0)
    for k in range(self.num_stages):
      (xs, carry), _ = jax.eval_shape(functools.partial(self._stage_init, k),
                                      key, ys, carry)
      if k == self.num_stages - 1:
        break
      for site, x in xs.items():
        shapes[site] = tuple(x.shape[1:])
      ys = {}
      for c in self.groups[k]:
        h, w, cin = shapes[c.site]
        if cin != c.in_features:
          raise ValueError(f"{c.name}: site {c.site} has {cin} channels, spec says {c.in_features}")
        ho, wo = c.output_hw(h, w)
        if ho < 1 or wo < 1:
          raise ValueError(
              f"{self.name}: input {self.input_shape[:2]} is too small for {c.name}")
        ys[c.name] = jax.ShapeDtypeStruct((1, ho, wo, c.features), jnp.float32)
    return shapes

  # ------------------------------------------------------------------ params
  def init(self, key: jax.Array) -> dict[str, Any]:
    """Initial variables ``{'params': {'convs', 'stages'}, 'batch_stats': {'stages'}}``.

    Convolution kernels use He-normal (fan-out) init, biases zero; each stage
    initialises its own parameters from its own key; the leaves are in
    :func:`asymml_jax.precision.float_dtype`.
    """
    shapes = self.site_shapes  # validates geometry
    conv_key, stage_key = jax.random.split(key)
    convs = {}
    init = layers.he_normal_fan_out()
    for i, (name, c) in enumerate(self.convs.items()):
      kernel = init(jax.random.fold_in(conv_key, i),
                    (*c.kernel_size, c.in_features, c.features), jnp.float32)
      convs[name] = {"kernel": kernel}
      if c.use_bias:
        convs[name]["bias"] = jnp.zeros((c.features,), jnp.float32)
    stage_params, stage_stats = {}, {}
    carry = {"image": jnp.zeros((1, *self.input_shape), jnp.float32)}
    ys: dict = {}
    for k in range(self.num_stages):
      (xs, carry), variables = self._stage_init(
          k, jax.random.fold_in(stage_key, k), ys, carry)
      stage_params[str(k)] = variables.get("params", {})
      stage_stats[str(k)] = variables.get("batch_stats", {})
      if k < self.num_stages - 1:
        ys = {}
        for c in self.groups[k]:
          ho, wo = c.output_hw(*shapes[c.site][:2])
          ys[c.name] = jnp.zeros((1, ho, wo, c.features), jnp.float32)
    # Drawn in float32, then cast: both precisions start from the same values.
    return precision.cast_floats({"params": {"convs": convs, "stages": stage_params},
                                  "batch_stats": {"stages": stage_stats}})
