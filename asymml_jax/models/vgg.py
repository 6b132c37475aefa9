"""VGG11 / VGG16 with normalisation (Simonyan and Zisserman, 2015) as staged models.

Convolutions are 3x3, stride 1, padding 1; each is followed (in a trusted
stage) by normalisation of the full output, ReLU and, where the configuration
says ``M``, 2x2 max pooling.  The head is a global average pool and one linear
layer (the CIFAR-style VGG head; it runs in the trusted stage with the loss).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from asymml_jax import layers
from asymml_jax.models.base import MIN_INPUT_SIZE, InputStage, StagedModel
from asymml_jax.ops import ConvSpec

CONFIGS: dict[str, tuple] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


class VGGStage(nn.Module):
  """Trusted stage after conv ``conv``: norm -> ReLU -> [max pool] -> next site or head."""

  conv: str
  norm: str
  pool: bool
  out_site: str | None
  num_classes: int

  @nn.compact
  def __call__(self, ys: Mapping[str, jax.Array], carry, train: bool):
    h = nn.relu(layers.Norm(self.norm)(ys[self.conv], train))
    if self.pool:
      h = layers.pool(h, "max", 2, 2)
    if self.out_site is None:
      return {"logits": nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST)(layers.global_avg_pool(h))}, carry
    return {self.out_site: h}, carry


def vgg(name: str, *, num_classes: int = 10, input_shape=(32, 32, 3),
        width: float = 1.0, norm: str = "batch") -> StagedModel:
  """Builds ``vgg11`` or ``vgg16`` for ``input_shape = (H, W, C)``, ``H, W >= 32``."""
  if name not in CONFIGS:
    raise ValueError(f"unknown VGG {name!r}; choices: {sorted(CONFIGS)}")
  h, w, c = (int(v) for v in input_shape)
  if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
    raise ValueError(f"{name} needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {h}x{w}")
  if c < 1:
    raise ValueError(f"channels must be >= 1, got {c}")
  cfg = CONFIGS[name]
  stages: list[nn.Module] = [InputStage(site="s0")]
  groups: list[tuple[ConvSpec, ...]] = []
  cin, idx = c, 0
  for i, v in enumerate(cfg):
    if v == "M":
      continue
    cout = layers.num_channels(v, width)
    # A bias before BatchNorm is cancelled by its mean subtraction: omit it.
    groups.append((ConvSpec(name=f"conv{idx}", site=f"s{idx}", in_features=cin,
                            features=cout, use_bias=norm != "batch"),))
    pool = i + 1 < len(cfg) and cfg[i + 1] == "M"
    last = all(x == "M" for x in cfg[i + 1:])
    stages.append(VGGStage(conv=f"conv{idx}", norm=norm, pool=pool,
                           out_site=None if last else f"s{idx + 1}",
                           num_classes=num_classes))
    cin, idx = cout, idx + 1
  return StagedModel(name=name, input_shape=(h, w, c), num_classes=num_classes,
                     stages=tuple(stages), groups=tuple(groups), norm=norm, width=width)
