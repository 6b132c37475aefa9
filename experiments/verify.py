"""Checks that every listed backend gives the dense model's loss and gradients.

  python -m experiments.verify --model=vgg11 --backends=dense,inline,local --json=out.json

Data parallelism (DESIGN section 10): --num_devices=N runs the listed backends
on an N-device mesh and compares them with single-device dense; on a CPU host,
make N devices with

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m experiments.verify \
      --backends=inline,enclave --num_devices=4

(for local and enclave the script forces one spare CPU device, which their
host callbacks need, see asymml_jax.parallel; the mesh still has N devices).

Noise and clipping are off (gradient protection on unless
--gradient_protection=none); the relative L2 error of the loss and of the worst
gradient leaf against ``dense`` are printed and written to --json.  The run
passes (exit status 0) when both stay within max(1e-4, 2 x the float32 floor),
or, with --dtype=float64, within 1e-10:

  python -m experiments.verify --dtype=float64 --model=resnet20 \
      --backends=dense,inline,local,enclave,tee_only
  python -m experiments.verify --images=DIR --input_size=64   # your own photographs
"""

import tempfile

from absl import app, flags

from asymml_jax import parallel, precision, verify
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from asymml_jax.train import write_json_atomic

import enclave_bridge  # registers the process backends (enclave, tee_only)

_MODEL = flags.DEFINE_string("model", "vgg11", "Model name.")
_BACKENDS = flags.DEFINE_list("backends", ["dense", "inline", "local"], "Backends to compare.")
_SIZE = flags.DEFINE_integer("input_size", 32, "Image height and width (>= 32).")
_CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Channel width multiplier.")
_NORM = flags.DEFINE_enum("norm", "batch", ["batch", "group", "none"], "Normalisation.")
_RANK = flags.DEFINE_float("rank_fraction", 1.0 / 16.0, "r_max / C.")
_TAU = flags.DEFINE_float("tau", 0.1, "Residual-energy threshold.")
_FORCE = flags.DEFINE_enum("force", None, ["per_sample", "per_batch", "trusted"],
                           "Force one mode wherever a split is possible.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for parameters and batch.")
_JSON = flags.DEFINE_string("json", None, "Write the result here.")
_GRAD = flags.DEFINE_enum("gradient_protection", "decompose", ["decompose", "none"],
                          "decompose: only the residual of each output gradient leaves the "
                          "TEE; none: the full dY leaves (the reference implementation).")
_FLOOR = flags.DEFINE_bool("floor", True, "Also measure the float32 floor of dense itself "
                           "(float32 only).")
_FLOOR_SEEDS = flags.DEFINE_integer("floor_seeds", 8, "Perturbation draws of the floor; "
                                    "the floor is their maximum.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(precision.DTYPES),
                           "float64: every backend, the enclave included, computes in float64 "
                           "and must match dense to 1e-10 (the sharp invariant).")
_IMAGES = flags.DEFINE_string("images", None, "Check on the first --batch_size images of this "
                              "folder (one sub-folder per class); sets the input shape.")
_NPZ = flags.DEFINE_string("npz", None, "Check on the first --batch_size examples of this .npz "
                           "(arrays 'image' (N, H, W, C) and 'label'); sets the input shape.")
_DEVICES = flags.DEFINE_integer("num_devices", 1,
                                "Run the listed backends data-parallel on a mesh of this many "
                                "devices (the batch size must divide by it); the reference is "
                                "dense on one device.")
_VERIFY = flags.DEFINE_bool("verify_untrusted", False,
                            "The trusted stages of the split backends also check every "
                            "accelerator result (Freivalds test, asymml_jax.integrity).")


def _model_and_batch():
  """The model, and the user's batch (or None: a random one)."""
  if _IMAGES.value and _NPZ.value:
    raise ValueError("give --images or --npz, not both")
  batch, num_classes = None, 10
  if _IMAGES.value:
    batch, num_classes = verify.batch_from_folder(_IMAGES.value, _SIZE.value, _BATCH.value)
  elif _NPZ.value:
    batch, num_classes = verify.batch_from_npz(_NPZ.value, _BATCH.value)
  shape = ((_SIZE.value, _SIZE.value, _CHANNELS.value) if batch is None
           else tuple(batch["image"].shape[1:]))
  model = get_model(_MODEL.value, input_shape=shape, width=_WIDTH.value, norm=_NORM.value,
                    num_classes=num_classes)
  return model, batch


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if _BATCH.value < 1:
      raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
    if _DTYPE.value == "float64" and _VERIFY.value:
      raise ValueError("--verify_untrusted checks float32 results; leave it off with "
                       "--dtype=float64")
    if set(_BACKENDS.value) & {"local", "enclave"} or _VERIFY.value:
      # Host callbacks on a CPU mesh need a CPU device outside it (asymml_jax.parallel).
      note = parallel.reserve_spare_cpu_device(_DEVICES.value)
      if note:
        print(note)
    # make_mesh refuses a count below 1 or above this host's devices (with the XLA_FLAGS hint).
    mesh = None if _DEVICES.value == 1 else parallel.make_mesh(_DEVICES.value)
    model, batch = _model_and_batch()
    with tempfile.TemporaryDirectory(prefix="asymml-verify-") as tmp:
      result = verify.compare(
          model, _BACKENDS.value, batch_size=_BATCH.value, batch=batch, dtype=_DTYPE.value,
          decomposition=DecompositionConfig(rank_fraction=_RANK.value, tau=_TAU.value,
                                            verify_untrusted=_VERIFY.value),
          seed=_SEED.value, force=_FORCE.value,
          prepare=enclave_bridge.verification_options(tmp, model.num_classes),
          floor=_FLOOR.value, floor_seeds=_FLOOR_SEEDS.value,
          gradient_protection=_GRAD.value, mesh=mesh)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  _print(result)
  if _JSON.value:
    write_json_atomic(_JSON.value, result)
  if not result["passed"]:
    raise SystemExit(1)


def _print(result: dict) -> None:
  for r in result["backends"]:
    print(f"{r['name']:<9} loss {r['loss']:.6f}  rel_err_loss {r['rel_err_loss']:.2e}  "
          f"rel_err_grads {r['rel_err_grads']:.2e} ({r['worst_leaf']})  "
          f"on {r['grad_devices']} device(s)")
  fl = result.get("float32_floor")
  if fl:
    lo, hi = fl["spread"]
    print(f"{'f32 floor':<9} (dense vs dense perturbed at float32 rounding, worst of "
          f"{len(fl['per_seed'])} draws) rel_err_loss {fl['rel_err_loss']:.2e}  "
          f"rel_err_grads {fl['rel_err_grads']:.2e} ({fl['worst_leaf']}; draws span "
          f"{lo:.2e}..{hi:.2e})")
  verdict = "passed" if result["passed"] else "FAILED"
  print(f"{result['dtype']}: max_rel_err_loss {result['max_rel_err_loss']:.2e}  "
        f"max_rel_err_grads {result['max_rel_err_grads']:.2e}  tolerance "
        f"{result['tolerance']:.1e}: {verdict}")


if __name__ == "__main__":
  app.run(main)
