"""Tables and plots of a benchmark report."""

from __future__ import annotations

import pytest

from enclave_bridge import benchmark_report as report_lib


def _synthetic_report(with_roofline: bool) -> dict:
  from asymml_jax import roofline
  peaks = roofline.Peaks(matmul_macs_per_s=1e9, stream_bytes_per_s=1e9)
  costs = {"forward/0": roofline.StageCost(2_000_000, 500_000, 500_000),
           "backward/0": roofline.StageCost(4_000_000, 0, 1_000)}
  med = {"wall_s": 0.02, "trusted_compute_s": 0.01, "overlap_s": 0.0,
         "untrusted_compute_s": 0.01, "transfer_s": 0.0, "waiting_s": 0.0}
  row = {"median": med, "ratio_wall_vs_tee_only": 1.0, "ratio_trusted_vs_tee_only": 1.0,
         "trusted_peak_rss_bytes": None,
         "roofline": (roofline.compare(costs, peaks, {"forward/0": 0.008}, 0.01)
                      if with_roofline else None)}
  return {"settings": {"mode": "train"},
          "machine": {"peaks": {**peaks.to_dict(), "cores": [1]} if with_roofline else None},
          "models": {"tiny": {"backends": {"enclave": row},
                              "plan": {"trusted_mac_ratio_forward": 2.0,
                                       "trusted_mac_ratio_train": 1.5}}}}


def test_roofline_table_has_a_line_per_stage_and_the_whole_step():
  lines = report_lib.roofline_table(_synthetic_report(True))
  assert any("1.0 GMAC/s matmul, 1.0 GB/s stream" in line for line in lines)
  by_key = {line.split()[2]: line for line in lines if line.startswith("tiny ")}
  assert set(by_key) == {"forward/0", "backward/0", "whole"}
  assert by_key["forward/0"].split()[3:] == ["2.0", "1.00", "2.000", "8.000", "25.0%"]
  assert by_key["backward/0"].split()[-2:] == ["-", "-"]  # not measured
  assert by_key["whole"].split()[-3:] == ["6.000", "10.000", "60.0%"]
  table = report_lib.format_table(_synthetic_report(True))
  assert "(forward): 2.00x, (training step): 1.50x" in table
  assert report_lib.roofline_table(_synthetic_report(False)) == []


@pytest.mark.parametrize("with_roofline", [True, False])
def test_plot_adds_the_roofline_row_only_with_figures(tmp_path, with_roofline):
  from PIL import Image
  png = tmp_path / "p.png"
  report_lib.plot(_synthetic_report(with_roofline), str(png))
  height = Image.open(png).size[1]
  assert height == (880 if with_roofline else 440)  # 4 in per row at 110 dpi
  assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary file left
