"""The process boundary: enclave host, bridge client, ledger, sealing, launcher.

Importing this package registers the ``enclave`` and ``tee_only`` backends
with :mod:`asymml_jax.backends` (the library never imports the bridge).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from asymml_jax import backends as _backends


def sealed_data_info(options: Mapping[str, Any]) -> dict:
  """Public description of the sealed data set named by ``options['sealed_path']``.

  Includes ``shard: (i, n)`` for a container sealed with ``--shard=i/n``.
  """
  from enclave_bridge import seal
  path = options.get("sealed_path")
  if not path:
    raise ValueError("the enclave backends need config.bridge.sealed_path (a data set "
                     "sealed with `python -m enclave_bridge.seal`)")
  header = seal.read_header(str(path))
  arrays = {a["name"]: a for a in header["arrays"]}
  info = {"name": header["name"], "num_classes": int(header["num_classes"]),
          "image_shape": tuple(arrays["train_images"]["shape"][1:]),
          "num_train": int(arrays["train_labels"]["shape"][0]),
          "num_test": int(arrays["test_labels"]["shape"][0])}
  if "shard" in header:  # shard i of n of a data set (one host of a multi-host run)
    info["shard"] = (int(header["shard"]["index"]), int(header["shard"]["count"]))
  return info


def seal_arrays(directory: str, images, labels, num_classes: int,
                name: str = "arrays", key: bytes | None = None) -> dict:
  """Seals ``images``/``labels`` (used as both splits) under ``directory``.

  Returns the bridge options ``{"sealed_path", "key_path", "workdir"}`` for an
  enclave that samples from exactly these examples (verification, benchmarks).
  ``key``: fixed key bytes (see :func:`enclave_bridge.seal.generate_key_file`).
  """
  import os

  import numpy as np

  from asymml_jax.data import Dataset
  from enclave_bridge import seal

  os.makedirs(directory, exist_ok=True)
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int32)
  ds = Dataset(name=name, train_images=images, train_labels=labels,
               test_images=images, test_labels=labels, num_classes=num_classes)
  key_path = os.path.join(directory, "key.bin")
  if key is not None or not os.path.exists(key_path):
    seal.generate_key_file(key_path, key=key, overwrite=key is not None)
  sealed = os.path.join(directory, f"{name}.sealed")
  seal.seal_dataset(ds, sealed, key_path)
  return {"sealed_path": sealed, "key_path": key_path, "workdir": directory}


# The verification batch's key: fixed, so the enclave's RNG (derived from the key,
# server.trusted_seed) and so its figures repeat from run to run.  The batch is
# the checker's own data, not a secret.
VERIFY_KEY = hashlib.sha256(b"asymml-jax verification batch").digest()


def verification_options(workdir: str, num_classes: int):
  """A ``prepare`` hook for :func:`asymml_jax.verify.compare`: seals the batch.

  The enclave then samples exactly that batch, in the caller's order, at step
  0: the images are sealed in the order its sampler
  (:func:`asymml_jax.data.step_indices`, seed 0) reads them back, under
  :data:`VERIFY_KEY`.
  """
  import os

  import numpy as np

  from asymml_jax import data

  def prepare(name: str, batch) -> dict:
    n = len(batch["label"])
    drawn = data.step_indices(n, n, seed=0, step=0)  # the enclave's batch j is sealed[drawn[j]]
    order = np.empty(n, np.int64)
    order[drawn] = np.arange(n)
    opts = seal_arrays(os.path.join(workdir, name), np.asarray(batch["image"])[order],
                       np.asarray(batch["label"])[order], num_classes, name="verify-batch",
                       key=VERIFY_KEY)
    return {**opts, "seed": 0}
  return prepare


def _enclave(model, plan, key, **options):
  from enclave_bridge.client import EnclaveBackend
  return EnclaveBackend(model, plan, key, **options)


def _tee_only(model, plan, key, **options):
  from enclave_bridge.client import TeeOnlyBackend
  return TeeOnlyBackend(model, plan, key, **options)


_backends.register_backend("enclave", _enclave, data_info=sealed_data_info)
_backends.register_backend("tee_only", _tee_only, data_info=sealed_data_info)
