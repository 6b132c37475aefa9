"""`make demo`: seal MNIST-5k, start the enclave, train through it, report.

  python -m experiments.demo [--workdir=runs/demo] [--backend=enclave]
  python -m experiments.demo --num_processes=2   # several "hosts" on this machine

1. Seals the 5,000 embedded MNIST digits into ``WORKDIR/mnist5k.sealed`` with a
   new key ``WORKDIR/key.bin`` (once; later runs reuse them).
2. Trains the MNIST config with the trusted half in the enclave process: the
   enclave decrypts the data, samples every batch and runs every trusted
   stage; this process only sees residuals and public weights.
3. Prints test accuracy, epsilon, the time breakdown and the ledger summary,
   and checks that the enclave process is gone.

With ``--num_processes=N`` (N > 1) it runs the same training as N processes
joined by ``jax.distributed`` (``experiments/multihost.py``, DESIGN section
10): each seals and serves its own shard of MNIST-5k in its own enclave,
under ``WORKDIR/multihost``; the report then adds the global sampling rate and
checks that every enclave is gone.
"""

import json
import os
import subprocess
import sys

from absl import app, flags, logging

import enclave_bridge  # registers the enclave backends
from asymml_jax import data, train
from enclave_bridge import seal
from experiments.configs import mnist, mnist_dp

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_BACKEND = flags.DEFINE_enum("backend", "enclave", ["enclave", "tee_only", "local", "inline"],
                             "Backend to train with.")
_EPOCHS = flags.DEFINE_float("num_epochs", None, "Override the config's epochs.")
_CONFIG = flags.DEFINE_enum("config", "mnist", ["mnist", "mnist_dp"],
                            "mnist (no noise) or mnist_dp (epsilon 8, delta 1e-5).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Processes (simulated hosts, each with its own enclave and data "
    "shard) joined by jax.distributed; 1: the single-process demo.")


def ensure_sealed(workdir: str) -> tuple[str, str]:
  """Seals MNIST-5k under ``workdir`` unless it already is; returns (sealed, key)."""
  sealed, key = os.path.join(workdir, "mnist5k.sealed"), os.path.join(workdir, "key.bin")
  os.makedirs(workdir, exist_ok=True)
  if os.path.exists(sealed) and os.path.exists(key):
    seal.read_header(sealed)  # a damaged container is an error, not a silent reseal
    return sealed, key
  if not os.path.exists(key):
    seal.generate_key_file(key)
  header = seal.seal_dataset(data.load_dataset("mnist5k"), sealed, key)
  print(f"sealed {header['name']}: {sealed} (key {key})")
  return sealed, key


def run_multihost(workdir: str, num_processes: int) -> dict:
  """Trains with ``num_processes`` processes (experiments/multihost.py); returns the summary."""
  if _BACKEND.value not in ("enclave", "tee_only"):
    raise app.UsageError("--num_processes > 1 runs one enclave per process: use "
                         "--backend=enclave or tee_only")
  run = os.path.join(workdir, "multihost")
  cmd = [sys.executable, "-m", "experiments.multihost", f"--num_processes={num_processes}",
         f"--workdir={run}", "--dataset=mnist5k",
         f"--config=experiments/configs/{_CONFIG.value}.py",
         f"--config.backend={_BACKEND.value}"]
  if _EPOCHS.value is not None:
    cmd.append(f"--config.num_epochs={_EPOCHS.value}")
  status = subprocess.call(cmd)
  if status:
    raise SystemExit(f"the multi-process run failed (status {status}); rerun to resume")
  with open(os.path.join(run, "train", "summary.json")) as f:
    return json.load(f)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  if _NUM_PROCESSES.value > 1:
    s = run_multihost(workdir, _NUM_PROCESSES.value)
    summary_path = os.path.join(workdir, "multihost", "train", "summary.json")
  else:
    sealed, key = ensure_sealed(workdir)
    config = (mnist_dp if _CONFIG.value == "mnist_dp" else mnist).get_config()
    config.backend = _BACKEND.value
    if _EPOCHS.value is not None:
      config.num_epochs = _EPOCHS.value
    config.bridge.sealed_path, config.bridge.key_path = sealed, key
    config.bridge.workdir = os.path.join(workdir, "enclave")
    s = train.train_and_evaluate(config, os.path.join(workdir, "train"))
    summary_path = os.path.join(workdir, "train", "summary.json")
  print(f"\n=== AsymML demo: MNIST-5k, vgg11 (width 0.25), config {_CONFIG.value} ===")
  print(f"test_accuracy  {s['test_accuracy']:.4f}  ({s['test_examples']} held-out digits)")
  priv = s.get("privacy") or {}
  if priv.get("enabled"):
    print(f"epsilon        {s['epsilon']:.3f}  (delta {priv['delta']:g}, sigma "
          f"{priv['noise_multiplier']:.3f}, {priv['releases_per_step']} releases per "
          f"example and step, {priv['steps']} steps)")
  else:
    print(f"epsilon        inf  (DP off: residuals leave without noise; "
          f"--config=mnist_dp for DP)")
  print(f"backend        {s['backend']}   steps {s['steps']}   wall {s['wall_seconds']:.0f} s")
  d = s.get("distributed")
  if d:
    print(f"processes      {d['num_processes']} (jax.distributed), shards of "
          f"{', '.join(str(n) for n in d['shard_sizes'])} examples; global batch "
          f"{d['global_batch_size']}, sampling rate q {d['sampling_rate']:.5f} (global); "
          f"parameters identical on all: {d['params_identical']}")
  b = s.get("breakdown") or {}
  if b:
    print("\ntime breakdown (training and evaluation, seconds):")
    for k in ("trusted_compute_s", "untrusted_compute_s", "transfer_s", "waiting_s"):
      print(f"  {k[:-2]:<20} {b.get(k, 0.0):8.1f}")
    print(f"  {'bridge calls':<20} {b.get('bridge_calls', 0):8d}")
  ledger = s.get("ledger") or {}
  if ledger:
    print("\nledger summary (what crossed the trust boundary):")
    print(f"  {'tensor class':<24} {'direction':<22} {'tensors':>8} {'MB':>9}")
    for row in ledger["to_untrusted"] + ledger["to_enclave"]:
      print(f"  {row['class']:<24} {row['direction']:<22} {row['tensors']:>8} "
            f"{row['bytes'] / 1e6:>9.1f}")
  pids = (d or {}).get("enclave_pids") or [(s.get("enclave") or {}).get("pid")]
  for pid in filter(None, pids):
    alive = os.path.exists(f"/proc/{pid}")
    print(f"{chr(10) if pid == pids[0] else ''}enclave process {pid}: "
          f"{'STILL RUNNING' if alive else 'stopped'}")
  print(f"summary: {summary_path}")


if __name__ == "__main__":
  app.run(main)
