"""Model zoo: VGG11/VGG16, ResNet18 (ImageNet layout), ResNet20 (CIFAR layout)."""

from __future__ import annotations

import functools

from asymml_jax.models.base import StagedModel
from asymml_jax.models.resnet import resnet
from asymml_jax.models.vgg import vgg

MODELS = {
    "vgg11": functools.partial(vgg, "vgg11"),
    "vgg16": functools.partial(vgg, "vgg16"),
    "resnet18": functools.partial(resnet, "resnet18"),
    "resnet20": functools.partial(resnet, "resnet20"),
}


def get_model(name: str, *, num_classes: int = 10, input_shape=(32, 32, 3),
              width: float = 1.0, norm: str = "batch") -> StagedModel:
  """Builds a model by name; unknown names list the choices."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choices: {', '.join(sorted(MODELS))}")
  if not 0 < width <= 4:
    raise ValueError(f"width must be in (0, 4], got {width}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  return MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape),
                      width=width, norm=norm)


__all__ = ["MODELS", "StagedModel", "get_model"]
