"""ResNet18 (ImageNet layout, He et al. 2016) and ResNet20 (CIFAR layout) as staged models.

Basic blocks ``out = relu(norm(conv2(relu(norm(conv1(x))))) + shortcut(x))``;
the shortcut is the identity, or a 1x1 strided convolution with normalisation
when the shape changes (option B).  A block's input is decomposed once and
read by both ``conv1`` and the shortcut convolution; the identity shortcut
(the full, private ``x``) is carried inside the trusted side.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from asymml_jax import layers
from asymml_jax.models.base import MIN_INPUT_SIZE, InputStage, StagedModel
from asymml_jax.ops import ConvSpec

ARCHS: dict[str, dict] = {
    # widths, blocks per layer, ImageNet stem (7x7/2 conv + 3x3/2 max pool)?
    "resnet18": dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), imagenet_stem=True),
    "resnet20": dict(widths=(16, 32, 64), blocks=(3, 3, 3), imagenet_stem=False),
}


class StemStage(nn.Module):
  """After the stem conv: norm -> ReLU -> [3x3/2 max pool, padding 1]."""

  conv: str
  norm: str
  max_pool: bool
  out_site: str

  @nn.compact
  def __call__(self, ys: Mapping[str, jax.Array], carry, train: bool):
    h = nn.relu(layers.Norm(self.norm)(ys[self.conv], train))
    if self.max_pool:
      h = layers.pool(h, "max", 3, 2, padding=1)
    return {self.out_site: h}, {"shortcut": h}


class BlockMidStage(nn.Module):
  """Inside a block: ``h = relu(norm(conv1(x)))``; shortcut = norm(sc(x)) or x."""

  conv1: str
  shortcut_conv: str | None
  norm: str
  out_site: str

  @nn.compact
  def __call__(self, ys: Mapping[str, jax.Array], carry, train: bool):
    h = nn.relu(layers.Norm(self.norm)(ys[self.conv1], train))
    if self.shortcut_conv is None:
      shortcut = carry["shortcut"]
    else:
      shortcut = layers.Norm(self.norm)(ys[self.shortcut_conv], train)
    return {self.out_site: h}, {"shortcut": shortcut}


class BlockEndStage(nn.Module):
  """End of a block: ``out = relu(norm(conv2(h)) + shortcut)``, then next site or head."""

  conv2: str
  norm: str
  out_site: str | None
  num_classes: int

  @nn.compact
  def __call__(self, ys: Mapping[str, jax.Array], carry, train: bool):
    out = nn.relu(layers.Norm(self.norm)(ys[self.conv2], train) + carry["shortcut"])
    if self.out_site is None:
      return {"logits": nn.Dense(self.num_classes, precision=jax.lax.Precision.HIGHEST)(layers.global_avg_pool(out))}, {}
    return {self.out_site: out}, {"shortcut": out}


def resnet(name: str, *, num_classes: int = 10, input_shape=(32, 32, 3),
           width: float = 1.0, norm: str = "batch") -> StagedModel:
  """Builds ``resnet18`` or ``resnet20`` for ``input_shape = (H, W, C)``, ``H, W >= 32``."""
  if name not in ARCHS:
    raise ValueError(f"unknown ResNet {name!r}; choices: {sorted(ARCHS)}")
  h, w, c = (int(v) for v in input_shape)
  if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
    raise ValueError(f"{name} needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, got {h}x{w}")
  if c < 1:
    raise ValueError(f"channels must be >= 1, got {c}")
  arch = ARCHS[name]
  widths = [layers.num_channels(v, width) for v in arch["widths"]]
  stem_w = widths[0]
  if arch["imagenet_stem"]:
    stem = ConvSpec(name="stem", site="input", in_features=c, features=stem_w,
                    kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                    use_bias=False)
  else:
    stem = ConvSpec(name="stem", site="input", in_features=c, features=stem_w,
                    use_bias=False)
  stages: list[nn.Module] = [InputStage(site="input")]
  groups: list[tuple[ConvSpec, ...]] = [(stem,)]
  site = "b0_in"
  stages.append(StemStage(conv="stem", norm=norm, max_pool=arch["imagenet_stem"],
                          out_site=site))
  cin = stem_w
  n_blocks = sum(arch["blocks"])
  b = 0
  for li, (cout, nb) in enumerate(zip(widths, arch["blocks"])):
    for bi in range(nb):
      stride = 2 if (li > 0 and bi == 0) else 1
      conv1 = ConvSpec(name=f"b{b}_conv1", site=site, in_features=cin, features=cout,
                       strides=(stride, stride), use_bias=False)
      group = [conv1]
      sc_name = None
      if stride != 1 or cin != cout:
        sc_name = f"b{b}_sc"
        group.append(ConvSpec(name=sc_name, site=site, in_features=cin, features=cout,
                              kernel_size=(1, 1), strides=(stride, stride),
                              padding=((0, 0), (0, 0)), use_bias=False))
      groups.append(tuple(group))
      mid = f"b{b}_mid"
      stages.append(BlockMidStage(conv1=conv1.name, shortcut_conv=sc_name, norm=norm,
                                  out_site=mid))
      groups.append((ConvSpec(name=f"b{b}_conv2", site=mid, in_features=cout,
                              features=cout, use_bias=False),))
      last = b == n_blocks - 1
      site = None if last else f"b{b + 1}_in"
      stages.append(BlockEndStage(conv2=f"b{b}_conv2", norm=norm, out_site=site,
                                  num_classes=num_classes))
      cin, b = cout, b + 1
  return StagedModel(name=name, input_shape=(h, w, c), num_classes=num_classes,
                     stages=tuple(stages), groups=tuple(groups), norm=norm, width=width)
