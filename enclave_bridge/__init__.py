"""The process boundary: enclave host, bridge client, ledger, sealing, launcher.

Importing this package registers the ``enclave`` and ``tee_only`` backends
with :mod:`asymml_jax.backends` (the library never imports the bridge).
"""

from __future__ import annotations

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
                name: str = "arrays") -> dict:
  """Seals ``images``/``labels`` (used as both splits) under ``directory``.

  Returns the bridge options ``{"sealed_path", "key_path", "workdir"}`` for an
  enclave that samples from exactly these examples (verification, benchmarks).
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
  key = os.path.join(directory, "key.bin")
  if not os.path.exists(key):
    seal.generate_key_file(key)
  sealed = os.path.join(directory, f"{name}.sealed")
  seal.seal_dataset(ds, sealed, key)
  return {"sealed_path": sealed, "key_path": key, "workdir": directory}


def verification_options(workdir: str, num_classes: int):
  """A ``prepare`` hook for :func:`asymml_jax.verify.compare`: seals the batch.

  The enclave then samples exactly that batch (in its own order) at step 0.
  """
  import os

  def prepare(name: str, batch) -> dict:
    return seal_arrays(os.path.join(workdir, name), batch["image"], batch["label"],
                       num_classes, name="verify-batch")
  return prepare


def _enclave(model, plan, key, **options):
  from enclave_bridge.client import EnclaveBackend
  return EnclaveBackend(model, plan, key, **options)


def _tee_only(model, plan, key, **options):
  from enclave_bridge.client import TeeOnlyBackend
  return TeeOnlyBackend(model, plan, key, **options)


_backends.register_backend("enclave", _enclave, data_info=sealed_data_info)
_backends.register_backend("tee_only", _tee_only, data_info=sealed_data_info)
