"""Tests of asymml_jax.models: VGG11/16 and ResNet18/20 as staged models (DESIGN sections 3-5).

Shapes and parameter trees are checked abstractly (``site_shapes`` and
``jax.eval_shape(model.init, key)``), which costs no FLOPs; a single real
``init`` of the smallest model checks the values.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from asymml_jax.models import MODELS, get_model
from asymml_jax.models.base import MIN_INPUT_SIZE

NAMES = ("vgg11", "vgg16", "resnet18", "resnet20")
SHAPES = ((32, 32, 3), (32, 32, 1), (32, 48, 3))


def _abstract_init(model):
  return jax.eval_shape(model.init, jax.random.key(0))


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Building and structure
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", NAMES)
def test_builds_and_params_match_conv_specs(name, shape):
  model = get_model(name, input_shape=shape)
  assert model.name == name and model.input_shape == shape
  shapes = model.site_shapes
  assert list(shapes) == list(model.site_order)
  assert shapes[model.site_order[0]] == shape  # the first site is the image
  for site, (h, w, c) in shapes.items():
    assert h >= 1 and w >= 1 and c >= 1, site
    assert model.consumers(site), site
  for cv in model.convs.values():
    assert shapes[cv.site][2] == cv.in_features, cv.name

  variables = _abstract_init(model)
  convs = variables["params"]["convs"]
  assert set(convs) == set(model.convs)
  for cname, cv in model.convs.items():
    assert convs[cname]["kernel"].shape == (*cv.kernel_size, cv.in_features, cv.features)
    assert ("bias" in convs[cname]) == cv.use_bias, cname
    # BatchNorm follows every conv: a bias would be cancelled, so there is none.
    assert not cv.use_bias, cname
  stages = variables["params"]["stages"]
  assert set(stages) == {str(k) for k in range(model.num_stages)}
  assert set(variables["batch_stats"]["stages"]) == set(stages)


@pytest.mark.parametrize("name,num_sites,num_convs", [
    ("vgg11", 8, 8), ("vgg16", 13, 13),
    # ResNets: input + (block input, block middle) per block; stem + two
    # convs per block + a 1x1 shortcut conv where the shape changes.
    ("resnet18", 1 + 2 * 8, 1 + 2 * 8 + 3), ("resnet20", 1 + 2 * 9, 1 + 2 * 9 + 2)])
def test_site_and_conv_counts(name, num_sites, num_convs):
  model = get_model(name)
  assert len(model.site_order) == num_sites
  assert len(model.convs) == num_convs


@pytest.mark.parametrize("name,shape,site,expected", [
    # ResNet18 at 32: 7x7/2 stem -> 16x16, 3x3/2 max pool -> 8x8x64.
    ("resnet18", (32, 32, 3), "b0_in", (8, 8, 64)),
    ("resnet18", (32, 32, 3), "b2_mid", (4, 4, 128)),
    ("resnet18", (32, 32, 3), "b7_mid", (1, 1, 512)),
    ("resnet18", (32, 48, 3), "b0_in", (8, 12, 64)),
    ("resnet18", (32, 48, 3), "b7_mid", (1, 2, 512)),
    ("resnet18", (64, 64, 3), "b0_in", (16, 16, 64)),
    ("resnet18", (64, 64, 3), "b7_mid", (2, 2, 512)),
    # VGG: four 2x2 pools before the last site (five in all).
    ("vgg11", (32, 32, 3), "s1", (16, 16, 64)),
    ("vgg11", (32, 32, 3), "s7", (2, 2, 512)),
    ("vgg11", (32, 48, 3), "s7", (2, 3, 512)),
    ("vgg16", (32, 32, 3), "s12", (2, 2, 512)),
    ("vgg16", (32, 32, 1), "s0", (32, 32, 1)),
    # ResNet20 (CIFAR stem, no pool): 32x32x16 -> 16x16x32 -> 8x8x64.
    ("resnet20", (32, 32, 3), "b0_in", (32, 32, 16)),
    ("resnet20", (32, 32, 3), "b3_mid", (16, 16, 32)),
    ("resnet20", (32, 32, 3), "b8_mid", (8, 8, 64)),
    ("resnet20", (32, 48, 1), "b8_mid", (8, 12, 64)),
])
def test_known_site_shapes(name, shape, site, expected):
  model = get_model(name, input_shape=shape)
  assert model.site_shapes[site] == expected


def test_last_sites():
  assert get_model("vgg11").site_order[-1] == "s7"
  assert get_model("vgg16").site_order[-1] == "s12"
  assert get_model("resnet18").site_order[-1] == "b7_mid"
  assert get_model("resnet20").site_order[-1] == "b8_mid"


def test_resnet18_stem_and_shortcuts():
  model = get_model("resnet18", input_shape=(32, 32, 3))
  stem = model.convs["stem"]
  assert (stem.kernel_size, stem.strides, stem.output_hw(32, 32)) == ((7, 7), (2, 2), (16, 16))
  # Shortcut convs read the block input together with conv1.
  for b in (2, 4, 6):
    assert [c.name for c in model.consumers(f"b{b}_in")] == [f"b{b}_conv1", f"b{b}_sc"]
  assert [c.name for c in model.consumers("b1_in")] == ["b1_conv1"]
  assert [c.name for c in model.consumers("b1_mid")] == ["b1_conv2"]


def test_resnet18_at_64():
  model = get_model("resnet18", input_shape=(64, 64, 3), num_classes=100)
  variables = _abstract_init(model)
  last = variables["params"]["stages"][str(model.num_stages - 1)]
  dense = jax.tree.leaves(last)
  assert sorted(x.shape for x in dense if len(x.shape) == 2) == [(512, 100)]


def test_vgg_without_batch_norm_has_conv_biases():
  model = get_model("vgg11", norm="group")
  convs = _abstract_init(model)["params"]["convs"]
  for cname, cv in model.convs.items():
    assert cv.use_bias
    assert convs[cname]["bias"].shape == (cv.features,)


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_channels(name):
  half = get_model(name, width=0.5)
  full = get_model(name)
  for site in full.site_order[1:]:
    assert half.site_shapes[site][2] * 2 == full.site_shapes[site][2], site


# ----------------------------------------------------------------------------
# Parameter counts (10 classes; BatchNorm statistics not counted)
# ----------------------------------------------------------------------------
# resnet20, option-B shortcuts:
#   stem 3*3*3*16 = 432, BN 32
#   layer1: 6 convs 3*3*16*16 = 13,824, BN 6*32 = 192
#   layer2: 3*3*16*32 = 4,608 + 5*3*3*32*32 = 46,080, sc 16*32 = 512,
#           BN 7*64 = 448
#   layer3: 3*3*32*64 = 18,432 + 5*3*3*64*64 = 184,320, sc 32*64 = 2,048,
#           BN 7*128 = 896
#   head 64*10 + 10 = 650                                   total 272,474
# resnet18: torchvision's 11,689,512 with a 1000-way head, minus
#   (512*1000 + 1000) - (512*10 + 10) = 507,870            total 11,181,642
# VGG (GAP + one linear layer; torchvision's VGG16 has ~138M because of its
# three fully connected layers):
#   vgg11 convs 9*(3*64 + 64*128 + 128*256 + 256*256 + 256*512 + 3*512*512)
#         = 9,217,728, BN 2*2,752 = 5,504, head 5,130      total 9,228,362
#   vgg16 convs 14,710,464, BN 2*4,224 = 8,448, head 5,130 total 14,724,042
PARAM_COUNTS = {"resnet20": 272_474, "resnet18": 11_181_642, "vgg11": 9_228_362,
                "vgg16": 14_724_042}


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(name):
  n = _num_params(_abstract_init(get_model(name))["params"])
  assert n == PARAM_COUNTS[name]
  if name == "resnet20":
    assert 260_000 <= n <= 280_000  # "0.27M"
  if name == "resnet18":
    assert 10_000_000 <= n <= 12_000_000  # "11.2M"


def test_vgg_conv_counts_from_the_architecture():
  for name, convs in (("vgg11", (3, 64, 128, 256, 256, 512, 512, 512, 512)),
                      ("vgg16", (3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512,
                                 512, 512, 512))):
    expected = sum(9 * a * b for a, b in zip(convs[:-1], convs[1:]))
    kernels = _abstract_init(get_model(name))["params"]["convs"]
    assert _num_params(kernels) == expected
  assert expected == 14_710_464


def test_grayscale_only_changes_the_first_conv():
  # resnet20: the stem loses 3*3*2*16 = 288 weights.
  gray = _num_params(_abstract_init(get_model("resnet20", input_shape=(32, 32, 1)))["params"])
  assert gray == PARAM_COUNTS["resnet20"] - 288


def test_real_init_values():
  model = get_model("resnet20", input_shape=(32, 32, 3))
  variables = model.init(jax.random.key(0))
  abstract = _abstract_init(model)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  for leaf in jax.tree.leaves(variables):
    assert np.all(np.isfinite(leaf))
  # He-normal with fan-out: std = sqrt(2 / (k*k*Cout)) = sqrt(2 / 576) for 3x3x64x64.
  kernel = np.asarray(variables["params"]["convs"]["b8_conv2"]["kernel"])
  assert kernel.std() == pytest.approx(np.sqrt(2 / 576), rel=0.1)
  again = model.init(jax.random.key(0))
  np.testing.assert_array_equal(kernel, again["params"]["convs"]["b8_conv2"]["kernel"])
  other = model.init(jax.random.key(1))
  assert not np.array_equal(kernel, other["params"]["convs"]["b8_conv2"]["kernel"])


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(31, 32, 3), (32, 31, 3), (16, 16, 1)])
def test_too_small_images_raise(name, shape):
  with pytest.raises(ValueError, match=f"at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"):
    get_model(name, input_shape=shape)


@pytest.mark.parametrize("name", NAMES)
def test_zero_channels_raise(name):
  with pytest.raises(ValueError, match="channels must be >= 1"):
    get_model(name, input_shape=(32, 32, 0))


def test_unknown_model_lists_choices():
  with pytest.raises(ValueError, match="choices: resnet18, resnet20, vgg11, vgg16") as e:
    get_model("vgg13")
  assert "'vgg13'" in str(e.value)
  assert sorted(MODELS) == sorted(NAMES)


@pytest.mark.parametrize("width", [0.0, -1.0, 4.5])
def test_bad_width_raises(width):
  with pytest.raises(ValueError, match="width must be in"):
    get_model("resnet20", width=width)


def test_bad_num_classes_raises():
  with pytest.raises(ValueError, match="num_classes"):
    get_model("vgg11", num_classes=1)


@pytest.mark.parametrize("name", NAMES)
def test_check_input(name):
  model = get_model(name, input_shape=(32, 48, 3))
  model.check_input(np.zeros((2, 32, 48, 3), np.float32))
  model.check_input(jax.ShapeDtypeStruct((1, 32, 48, 3), np.float32))
  expected = r"expects images of shape \(B, 32, 48, 3\)"
  for bad in [(2, 48, 32, 3), (2, 32, 48, 1), (32, 48, 3), (2, 32, 48, 3, 1)]:
    with pytest.raises(ValueError, match=expected):
      model.check_input(np.zeros(bad, np.float32))
  with pytest.raises(ValueError, match="at least one image"):
    model.check_input(np.zeros((0, 32, 48, 3), np.float32))
