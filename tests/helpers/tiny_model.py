"""A staged model of a few convolutions for fast tests of whole training-step programs.

Built from the VGG stage module (norm -> ReLU -> [2x2 max pool]) so that it
behaves like the zoo's models, but with two or three convolutions its training
step compiles in a fraction of VGG11's time.  Everything here is test
scaffolding.
"""

from __future__ import annotations

from asymml_jax.models.base import InputStage, StagedModel
from asymml_jax.models.vgg import VGGStage
from asymml_jax.ops import ConvSpec


def tiny_staged_model(input_shape=(8, 8, 3), channels=(4, 4), num_classes: int = 4,
                      norm: str = "group") -> StagedModel:
  """``conv0 -> pool -> conv1 [-> pool -> conv2 ...] -> head`` on ``input_shape``.

  Conv ``k`` reads site ``s<k>`` (``s0`` is the input) and has ``channels[k]``
  outputs; every conv but the last is followed by a 2x2 max pool, so site
  ``s<k>`` is ``H / 2^k x W / 2^k x channels[k-1]``.
  """
  h, w, c = (int(v) for v in input_shape)
  bias = norm != "batch"
  stages: list = [InputStage(site="s0")]
  groups = []
  cin = c
  for k, cout in enumerate(channels):
    last = k == len(channels) - 1
    groups.append((ConvSpec(name=f"conv{k}", site=f"s{k}", in_features=cin, features=cout,
                            use_bias=bias),))
    stages.append(VGGStage(conv=f"conv{k}", norm=norm, pool=not last,
                           out_site=None if last else f"s{k + 1}", num_classes=num_classes))
    cin = cout
  return StagedModel(name="tiny", input_shape=(h, w, c), num_classes=num_classes,
                     stages=tuple(stages), groups=tuple(groups), norm=norm)
