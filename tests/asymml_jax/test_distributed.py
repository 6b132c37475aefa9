"""Multi-host settings, data shards, global accounting and the process group (DESIGN section 10).

The unit tests run in this process.  The process-group tests start two real
``jax.distributed`` processes (``tests/helpers/multihost_worker.py``, no
model: a few seconds each) and check the XLA collectives and the failure
protocol: a failure in one process stops the other with an error naming it,
also when the other is busy and never reaches a collective.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from asymml_jax import data as data_lib
from asymml_jax import distributed as dist
from asymml_jax import train
from asymml_jax.decomposition import DecompositionConfig
from asymml_jax.models import get_model
from asymml_jax.privacy.config import PrivacyConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOOD = dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)


# ------------------------------------------------------------------ settings
def test_multihost_config_accepts_good_settings():
  c = dist.MultihostConfig(**GOOD)
  assert (c.num_processes, c.process_id, c.abort_timeout_s) == (2, 1, 20.0)
  dist.MultihostConfig(coordinator_address="[::1]:80", num_processes=1, process_id=0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.process_id = 0  # frozen


@pytest.mark.parametrize("change,words", [
    (dict(coordinator_address="localhost"), "host:port"),
    (dict(coordinator_address=":1234"), "no host"),
    (dict(coordinator_address="h:0"), "port must be in"),
    (dict(coordinator_address="h:99999"), "port must be in"),
    (dict(num_processes=0, process_id=0), "num_processes"),
    (dict(process_id=2), "process_id must be"),
    (dict(process_id=-1), "process_id must be"),
    (dict(process_id=True), "process_id must be"),
    (dict(abort_timeout_s=0.0), "abort_timeout_s"),
    (dict(heartbeat_timeout_s=1), "heartbeat_timeout_s"),
    (dict(step_timeout_s=0.5), "step_timeout_s"),
])
def test_multihost_config_refuses_bad_settings(change, words):
  with pytest.raises(ValueError, match=words):
    dist.MultihostConfig(**{**GOOD, **change})


@pytest.mark.parametrize("text,expected", [("0/2", (0, 2)), ("3/4", (3, 4)), (" 1/2 ", (1, 2))])
def test_parse_shard(text, expected):
  assert dist.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "1/0", "1/2/3"])
def test_parse_shard_refuses(text):
  with pytest.raises(ValueError, match="shard"):
    dist.parse_shard(text)


# --------------------------------------------------------------- data shards
def test_shards_are_disjoint_cover_everything_and_are_deterministic():
  n, count = 103, 4
  parts = [data_lib.shard_indices(n, i, count) for i in range(count)]
  joined = np.concatenate(parts)
  assert sorted(joined.tolist()) == list(range(n))  # disjoint and complete
  assert [len(p) for p in parts] == [26, 26, 26, 25]
  np.testing.assert_array_equal(parts[1], data_lib.shard_indices(n, 1, count))
  with pytest.raises(ValueError, match="index"):
    data_lib.shard_indices(n, 4, 4)
  with pytest.raises(ValueError, match="non-empty"):
    data_lib.shard_indices(3, 0, 4)


def test_shard_dataset_keeps_the_whole_sets_normalisation():
  ds = data_lib.load_dataset("mnist5k")
  a, b = (data_lib.shard_dataset(ds, i, 2) for i in range(2))
  assert len(a.train_labels) == len(b.train_labels) == 2250
  assert len(a.test_labels) + len(b.test_labels) == 500
  np.testing.assert_array_equal(a.train_images[1], ds.train_images[2])
  np.testing.assert_array_equal(b.test_labels[0], ds.test_labels[1])
  # Per-channel mean over both shards is the whole set's (~0), not re-centred per shard.
  both = np.concatenate([a.train_images, b.train_images])
  assert abs(float(both.mean())) < 1e-3
  assert data_lib.shard_dataset(ds, 0, 1) is ds


# ------------------------------------------------------- global batch and DP
def test_global_batch_splits_and_rates():
  g = dist.GlobalBatch(batch_size=64, shard_sizes=(2250, 2250), process_id=1)
  assert g.num_train == 4500 and g.local_num_train == 2250
  assert g.sampling_rate == pytest.approx(64 / 4500)  # global, not 32/4500 or 64/2250
  assert g.local_batch_size == 32
  assert g.local_expected_batch_size == pytest.approx(32.0)
  assert g.steps_per_epoch == 4500 // 64
  uneven = dist.GlobalBatch(batch_size=60, shard_sizes=(1000, 2000), process_id=1)
  assert uneven.local_expected_batch_size == pytest.approx(40.0)  # q * n_i, q = 60/3000
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    _ = dist.GlobalBatch(batch_size=63, shard_sizes=(2250, 2250)).local_batch_size
  with pytest.raises(ValueError, match="exceeds the 20 training examples of all 2 shards"):
    dist.GlobalBatch(batch_size=21, shard_sizes=(10, 10))
  with pytest.raises(ValueError, match="at least one"):
    dist.GlobalBatch(batch_size=1, shard_sizes=(10, 0))


def _dp_cfg() -> train.TrainConfig:
  return train.TrainConfig(
      model="vgg11", width=0.125, norm="group", batch_size=64, num_epochs=1.0,
      decomposition=DecompositionConfig(rank_fraction=0.25),
      privacy=PrivacyConfig(enabled=True, clip=1.0, target_epsilon=8.0, delta=1e-5))


def test_dp_accounting_uses_the_global_batch_and_sampling_rate():
  cfg = _dp_cfg()
  model = get_model("vgg11", num_classes=10, input_shape=(32, 32, 1), width=0.125,
                    norm="group")
  one = train.DpRun.make(cfg, model, 4500, 70)
  split = dist.GlobalBatch(batch_size=64, shard_sizes=(2250, 2250), process_id=1)
  two = train.DpRun.make(cfg, model, 4500, 70, split=split)
  # The union of the two enclaves' Poisson(q) samples is one Poisson(q) sample
  # of all 4,500 examples: the same accounting as one process holding them all.
  assert two.sampling_rate == pytest.approx(64 / 4500) == one.sampling_rate
  assert two.privacy.noise_multiplier == pytest.approx(one.privacy.noise_multiplier)
  assert two.epsilon(70) == pytest.approx(one.epsilon(70)) and two.epsilon(70) <= 8.0 + 1e-6
  # Each enclave samples its own shard at that rate: 32 expected of 2,250.
  assert two.expected_batch_size == pytest.approx(32.0)
  assert two.batch_rows == data_lib.poisson_max_batch(32.0, 2250) < one.batch_rows
  s = two.summary(70)
  assert s["num_processes"] == 2 and s["global_batch_size"] == 64 and s["num_train"] == 4500
  assert "global" in s["sampling_rate_basis"]
  # A per-shard rate (64 of 2,250) would have needed more noise for the same epsilon.
  wrong = train.DpRun.make(cfg, model, 2250, 70)
  assert wrong.privacy.noise_multiplier > two.privacy.noise_multiplier


def test_process_seeds_are_distinct_and_deterministic():
  assert dist.process_seed(7, 0, 1) == 7  # one process: the run's seed
  seeds = [dist.process_seed(7, i, 4) for i in range(4)]
  assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
  assert seeds == [dist.process_seed(7, i, 4) for i in range(4)]
  assert dist.process_seed(8, 0, 4) != seeds[0]


def test_format_process_paths():
  group = dist.LocalGroup()
  group.process_id, group.num_processes = 1, 2
  out = dist.format_process_paths(
      {"sealed_path": "d/x-{process_id}-of-{num_processes}.sealed", "key_path": "k.bin",
       "workdir": "w", "threads": 1}, group)
  assert out == {"sealed_path": "d/x-1-of-2.sealed", "key_path": "k.bin",
                 "workdir": os.path.join("w", "process-1"), "threads": 1}
  alone = dist.format_process_paths({"workdir": "w", "sealed_path": "{process_id}"}, dist.LOCAL)
  assert alone == {"workdir": "w", "sealed_path": "0"}


def test_local_group_collectives_are_identities():
  g = dist.LOCAL
  tree = {"a": np.ones(3)}
  assert g.all_reduce(tree, {"c": 1.0}, label="x") == (tree, {"c": 1.0})
  np.testing.assert_array_equal(g.all_gather(np.int32(5), label="x"), [5])
  assert g.broadcast(tree, label="x") is tree
  assert not g.multi and g.is_primary
  with g.guard():
    pass


def test_tree_digest_sees_any_change():
  a = {"w": np.arange(4, dtype=np.float32)}
  b = {"w": np.arange(4, dtype=np.float32)}
  assert dist.tree_digest(a) == dist.tree_digest(b)
  b["w"][2] = np.nextafter(b["w"][2], 10)
  assert dist.tree_digest(a) != dist.tree_digest(b)


def test_peer_failed_names_the_process_and_cause():
  e = dist.PeerFailed({"process": 1, "host": "h1", "position": "step 12",
                       "error": "EnclaveDied: the enclave process has exited"}, 0, 2)
  assert str(e) == ("process 1 of 2 (host h1) failed after step 12: EnclaveDied: the "
                    "enclave process has exited; stopping process 0 too")
  assert dist.exit_code(e) == dist.EXIT_PEER_FAILED
  assert dist.exit_code(RuntimeError()) == dist.EXIT_FAILED


# ------------------------------------------------- two real processes (XLA)
def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(tmp_path, scenario: str, timeout: float = 60.0):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs, outs = [], []
  for i in range(2):
    out = tmp_path / f"{scenario}-{i}.json"
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.multihost_worker", str(port), "2", str(i),
         scenario, str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  results = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    results.append((p.returncode, stderr, time.time()))
  seen = [json.loads(o.read_text()) if o.exists() else {} for o in outs]
  return results, seen


def test_two_processes_average_gather_and_broadcast_through_xla(tmp_path):
  results, seen = _run_pair(tmp_path, "ok")
  assert [r[0] for r in results] == [0, 0], [r[1][-2000:] for r in results]
  for s in seen:
    assert s["mean"] == [1.5, 1.5, 1.5]  # (1 + 2) / 2
    assert s["total"] == 30.0            # 10 + 20
    assert s["gather"] == [100, 101]     # in process order
    assert s["bcast"] == [0.0, 0.0]      # process 0's value everywhere


def test_a_failure_stops_every_process_with_an_error_naming_it(tmp_path):
  results, seen = _run_pair(tmp_path, "fail")
  assert results[1][0] == dist.EXIT_FAILED
  assert results[0][0] == dist.EXIT_PEER_FAILED, results[0][1][-2000:]
  assert "process 1 of 2" in seen[0]["error"] and "failed after step 2" in seen[0]["error"]
  assert "RuntimeError: enclave of process 1 died (simulated)" in results[0][1]
  assert seen[0]["stopped_at"] - seen[1]["failed_at"] < 5.0


def test_a_busy_process_is_ended_by_its_watcher(tmp_path):
  t0 = time.time()
  results, seen = _run_pair(tmp_path, "stuck")
  # Process 0 sleeps in Python and never reaches a collective: the watcher
  # ends it abort_timeout_s (4 s) after process 1's report, with the message.
  assert results[0][0] == dist.EXIT_PEER_FAILED
  assert "did not stop within 4 s" in results[0][1] and "process 1 of 2" in results[0][1]
  assert results[0][2] - seen[1]["failed_at"] < 12.0
  assert time.time() - t0 < 40.0


def test_processes_out_of_step_are_an_error_not_a_hang(tmp_path):
  results, seen = _run_pair(tmp_path, "out_of_step")
  assert all(r[0] != 0 for r in results)
  assert any("out of step" in s.get("error", "") and "'eval'" in s.get("error", "")
             for s in seen)
