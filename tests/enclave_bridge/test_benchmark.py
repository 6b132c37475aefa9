"""enclave_bridge/benchmark.py: settings, time split, pinning, one tiny run end to end."""

from __future__ import annotations

import json
import os

import pytest

from enclave_bridge import benchmark as bm
from enclave_bridge import benchmark_report as report_lib


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "serve"}, "mode must be one of"),
    ({"models": ()}, "at least one model"),
    ({"models": ("vgg99",)}, "unknown model 'vgg99'; choices:"),
    ({"backends": ("enclave", "dense")}, "must include 'tee_only'"),
    ({"backends": ("tee_only", "warp")}, "unknown backend 'warp'; choices:"),
    ({"backends": ("tee_only", "dense", "dense")}, "listed twice"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"repeats": 0}, "repeats must be an int >= 1"),
    ({"warmup": -1}, "warmup must be an int >= 0"),
    ({"width": 0.0}, "width must be in"),
    ({"scope": "per_pixel"}, "scope must be one of"),
    ({"untrusted_device": "gpu"}, "no gpu device is available"),
    ({"untrusted_device": "fpga"}, "untrusted device must be one of"),
    ({"mode": "train", "backends": ("tee_only", "slalom")}, "slalom is inference-only"),
    ({"roofline": 1}, "roofline must be a bool"),
])
def test_bad_settings_are_refused(kwargs, message):
  if kwargs.get("untrusted_device") == "gpu":
    import jax
    if any(d.platform == "gpu" for d in jax.devices()):
      pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match=message):
    bm.BenchmarkSettings(**kwargs)


def test_split_cores_and_refusal():
  assert bm.split_cores([3, 1]) == ({1}, {3})
  assert bm.split_cores(range(6)) == ({0, 1, 2}, {3, 4, 5})
  with pytest.raises(ValueError, match="at least 2 cores"):
    bm.split_cores([0])


def test_pin_process_sets_every_thread_and_can_be_undone():
  cores = bm.available_cores()
  if len(cores) < 2:
    pytest.skip("one core")
  pid = os.getpid()
  try:
    n = bm.pin_process(pid, {cores[-1]})
    assert n == len(os.listdir(f"/proc/{pid}/task"))
    for tid in os.listdir(f"/proc/{pid}/task"):
      assert os.sched_getaffinity(int(tid)) == {cores[-1]}
  finally:
    bm.pin_process(pid, set(cores))
  assert bm.available_cores() == cores


def test_split_time_partitions_the_wall_time():
  before = {"calls": 2, "call_s": 1.0, "server_s": 0.8, "compute_s": 0.5, "client_copy_s": 0.1}
  after = {"calls": 6, "call_s": 3.0, "server_s": 2.2, "compute_s": 1.5, "client_copy_s": 0.3}
  s = bm.split_time(2.5, before, after)
  assert s["trusted_compute_s"] == pytest.approx(1.0)
  assert s["transfer_s"] == pytest.approx(0.2 + 0.4)   # client copies + server non-compute
  assert s["waiting_s"] == pytest.approx(2.0 - 1.4 - 0.2)
  assert s["untrusted_compute_s"] == pytest.approx(0.5)
  assert s["bridge_calls"] == 4
  total = sum(s[k] for k in bm.BREAKDOWN_KEYS)
  assert total == pytest.approx(2.5)
  # no bridge: all of it is untrusted compute
  assert bm.split_time(0.7, {}, {})["untrusted_compute_s"] == pytest.approx(0.7)


def test_stage_breakdown_is_per_repeat_and_skips_control_ops():
  before = {"forward/1": {"calls": 1, "call_s": 1.0, "server_s": 1.0, "compute_s": 1.0,
                          "client_copy_s": 0.0}}
  after = {"forward/1": {"calls": 3, "call_s": 3.0, "server_s": 2.6, "compute_s": 2.0,
                         "client_copy_s": 0.2},
           "begin/0": {"calls": 2, "call_s": 0.1, "server_s": 0.0, "compute_s": 0.0,
                       "client_copy_s": 0.0}}
  out = bm.stage_breakdown(before, after, repeats=2)
  assert list(out) == ["forward/1"]
  assert out["forward/1"]["trusted_compute_s"] == pytest.approx(0.5)
  assert out["forward/1"]["bridge_calls"] == pytest.approx(1.0)


def test_crossed_bytes_and_bridge_figures():
  ledger = {"to_enclave": [{"class": "public_weights", "bytes": 600},
                           {"class": "conv_output_residual", "bytes": 100}],
            "to_untrusted": [{"class": "activation_residual", "bytes": 300}]}
  assert bm.crossed_bytes(ledger) == 1000
  assert bm.crossed_bytes(ledger, bm.RESIDUAL_CLASSES) == 400
  result = {"median": {"bridge_calls": 10, "transfer_s": 1e-6, "waiting_s": 1e-3},
            "bytes_per_repeat": {"all": 4000.0, "residuals": 400.0}}
  fig = bm.bridge_figures(result)
  assert fig["throughput_gb_s"] == pytest.approx(4.0)
  assert fig["fixed_overhead_us_per_call"] == pytest.approx(100.0)
  assert bm.bridge_figures({"median": {"bridge_calls": 0}}) is None


# ------------------------------------------------------------------ roofline
def test_measure_enclave_peaks_pinned_and_its_failure(monkeypatch):
  core = bm.available_cores()[-1]
  lines: list[str] = []
  peaks = bm.measure_enclave_peaks(1, {core}, lines.append)
  assert peaks["cores"] == [core] and peaks["threads"] == 1
  assert peaks["matmul_macs_per_s"] > 1e8 and peaks["stream_bytes_per_s"] > 1e8
  assert any(f"cores [{core}]" in line for line in lines)
  monkeypatch.setattr(bm, "PEAKS_TIMEOUT_S", 0.01)
  assert bm.measure_enclave_peaks(1, None, lines.append) is None
  assert "measuring the peaks failed" in lines[-1]


# ------------------------------------------------------------------ end to end
def test_tiny_run_reports_ratios_breakdown_and_memory(tmp_path):
  settings = bm.BenchmarkSettings(mode="train", models=("vgg11",), input_size=32, channels=3,
                                  batch_size=4, width=0.125, repeats=2, warmup=1)
  lines: list[str] = []
  report = bm.run(settings, workdir=str(tmp_path), log=lines.append)
  rows = report["models"]["vgg11"]["backends"]
  assert list(rows) == ["tee_only", "enclave", "dense"]
  base = rows["tee_only"]["median"]
  for name, r in rows.items():
    med = r["median"]
    assert len(r["repeats"]) == 2
    assert r["ratio_wall_vs_tee_only"] == pytest.approx(base["wall_s"] / med["wall_s"])
    # the four parts add up to the wall time of each repetition, less the
    # trusted compute that overlapped the untrusted side's
    for rep in r["repeats"]:
      assert 0.0 <= rep["overlap_s"] <= rep["trusted_compute_s"]
      assert (sum(rep[k] for k in bm.BREAKDOWN_KEYS) - rep["overlap_s"]
              == pytest.approx(rep["wall_s"], rel=1e-6))
  assert rows["tee_only"]["ratio_wall_vs_tee_only"] == pytest.approx(1.0)
  assert rows["dense"]["median"]["trusted_compute_s"] == 0.0
  assert rows["dense"]["trusted_peak_rss_bytes"] is None
  for name in ("tee_only", "enclave"):
    assert rows[name]["median"]["trusted_compute_s"] > 0
    assert rows[name]["trusted_peak_rss_bytes"] > 50 * 2**20  # a JAX process
  # The enclave computed low-rank convolutions while this process convolved
  # residuals (DESIGN section 3, step 3); tee_only has nothing to overlap.
  assert rows["enclave"]["median"]["overlap_s"] > 0
  assert rows["tee_only"]["median"]["overlap_s"] == 0.0
  stages = rows["enclave"]["stages"]
  assert any(k.startswith("forward/") for k in stages)
  assert any(k.startswith("backward/") for k in stages)
  assert list(rows["tee_only"]["stages"]) == ["whole_step/0"]
  bridge = report["models"]["vgg11"]["bridge"]
  assert bridge["residual_bytes_per_step"] > 0
  assert bridge["bytes_per_step"] >= bridge["residual_bytes_per_step"]
  assert report["models"]["vgg11"]["plan"]["trusted_mac_ratio_forward"] > 1
  assert report["models"]["vgg11"]["plan"]["trusted_mac_ratio_train"] > 1
  assert any("rep 2/2" in line for line in lines)
  _check_roofline(report, rows, train=True)
  # JSON-ready, a table and a picture
  json.dumps(report)
  table = report_lib.format_table(report)
  assert "planner trusted-MAC ratio" in table and "(training step)" in table
  assert "enclave   backward/1" in table and "tee_only  whole_step/0" in table
  png = tmp_path / "b.png"
  report_lib.plot(report, str(png))
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the enclaves are gone and their sealed copies are under the workdir only
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
      "vgg11-enclave", "vgg11-tee_only"]


def test_default_backends_add_slalom_for_inference_only():
  assert bm.BenchmarkSettings.default_backends("train") == ("tee_only", "enclave", "dense")
  assert bm.BenchmarkSettings.default_backends("infer") == (
      "tee_only", "enclave", "dense", "slalom")


def test_tiny_inference_run_times_slalom_from_its_own_counters(tmp_path):
  settings = bm.BenchmarkSettings(mode="infer", models=("vgg11",), input_size=32, channels=3,
                                  batch_size=2, width=0.125, repeats=2, warmup=1,
                                  backends=("tee_only", "slalom"))
  report = bm.run(settings, workdir=str(tmp_path), log=lambda s: None)
  rows = report["models"]["vgg11"]["backends"]
  slalom = rows["slalom"]
  assert slalom["precompute_s"] > 0 and rows["tee_only"]["precompute_s"] is None
  for rep in slalom["repeats"]:
    assert 0 < rep["trusted_compute_s"] < rep["wall_s"]
    assert rep["untrusted_compute_s"] == pytest.approx(rep["wall_s"] - rep["trusted_compute_s"])
    assert rep["bridge_calls"] == 0
  assert slalom["ratio_trusted_vs_tee_only"] == pytest.approx(
      rows["tee_only"]["median"]["trusted_compute_s"] / slalom["median"]["trusted_compute_s"])
  assert "slalom" in report_lib.format_table(report)
  _check_roofline(report, rows, train=False)
  assert rows["slalom"]["roofline"] is None  # no per-stage figures


def _check_roofline(report, rows, train):
  """Peaks measured; every bridged row's stages against the roofline."""
  peaks = report["machine"]["peaks"]
  assert peaks["matmul_macs_per_s"] > 1e8 and peaks["stream_bytes_per_s"] > 1e8
  for name, r in rows.items():
    roof = r["roofline"]
    if not r["stages"]:
      assert roof is None, name
      continue
    assert set(roof["stages"]) == set(r["stages"]), name  # the model's keys are measured
    for key, st in roof["stages"].items():
      assert st["macs"] >= 0 and st["bytes"] > 0 and st["roofline_s"] > 0, key
      assert st["trusted_compute_s"] == r["stages"][key]["trusted_compute_s"]
      assert st["efficiency"] == pytest.approx(st["roofline_s"] / st["trusted_compute_s"])
    whole = roof["whole_step"]
    assert whole["trusted_compute_s"] == r["median"]["trusted_compute_s"]
    assert whole["roofline_s"] == pytest.approx(
        sum(s["roofline_s"] for s in roof["stages"].values()))
    assert 0 < whole["efficiency"] < 10, name
  tee = rows["tee_only"]["roofline"]
  assert list(tee["stages"]) == ["whole_step/0"]
  plan = bm.bk.make_plan_for("tee_only", bm.get_model("vgg11", input_shape=(32, 32, 3),
                                                      width=0.125),
                             report["settings"]["batch_size"], bm.DecompositionConfig())
  assert tee["whole_step"]["macs"] == (3 if train else 1) * plan.dense_macs
