"""Tables and plots of a benchmark report (:func:`enclave_bridge.benchmark.run`).

The report is the JSON-ready dict the harness returns: per model, each backend's
median time breakdown, ratios to tee_only, peak memory and, when measured, the
roofline figures of every trusted stage.  :func:`format_table` and
:func:`roofline_table` print it; :func:`plot` draws the breakdown (and the
roofline row) and writes the PNG atomically.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np

BREAKDOWN_KEYS = ("trusted_compute_s", "untrusted_compute_s", "transfer_s", "waiting_s")
RATIO_BASELINE = "tee_only"

def format_table(report: Mapping[str, Any]) -> str:
  """A plain-text table of the report: medians, breakdown and ratios."""
  lines = []
  head = (f"{'model':<9}{'backend':<10}{'wall s':>9}{'trusted':>9}{'overlap':>9}"
          f"{'untrust':>9}{'transfer':>9}{'waiting':>9}{'x wall':>8}{'x trust':>8}"
          f"{'peak MB':>9}")
  lines.append(head)
  lines.append("-" * len(head))
  for mname, m in report["models"].items():
    for name, r in m["backends"].items():
      med = r["median"]
      rt = r["ratio_trusted_vs_tee_only"]
      peak = r["trusted_peak_rss_bytes"]
      lines.append(
          f"{mname:<9}{name:<10}{med['wall_s']:>9.3f}{med['trusted_compute_s']:>9.3f}"
          f"{med.get('overlap_s', 0.0):>9.3f}"
          f"{med['untrusted_compute_s']:>9.3f}{med['transfer_s']:>9.3f}{med['waiting_s']:>9.3f}"
          f"{r['ratio_wall_vs_tee_only']:>7.2f}x{(f'{rt:.2f}x' if rt else '-'):>8}"
          f"{(f'{peak / 2**20:.0f}' if peak else '-'):>9}")
    p = m["plan"]
    train_ratio = p.get("trusted_mac_ratio_train")
    lines.append(f"{mname:<9}planner trusted-MAC ratio (forward): "
                 f"{p['trusted_mac_ratio_forward']:.2f}x"
                 + (f", (training step): {train_ratio:.2f}x" if train_ratio else ""))
    b = m.get("bridge")
    if b:
      lines.append(f"{mname:<9}bridge: payloads {b['throughput_gb_s']:.2f} GB/s "
                   f"({b['residual_bytes_per_step'] / 1e6:.1f} of {b['bytes_per_step'] / 1e6:.1f} "
                   "MB per step residuals), "
                   f"fixed overhead {b['fixed_overhead_us_per_call']:.0f} us per call")
  lines += roofline_table(report)
  return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def roofline_table(report: Mapping[str, Any]) -> list[str]:
  """Lines of the roofline table: one per trusted stage and a whole-step line per backend."""
  peaks = report["machine"].get("peaks")
  if not peaks:
    return []
  head = (f"{'model':<9}{'backend':<10}{'stage':<14}{'MMACs':>10}{'MB':>9}"
          f"{'roofline ms':>12}{'measured ms':>12}{'effic.':>8}")
  lines = ["", f"roofline: {peaks['matmul_macs_per_s'] / 1e9:.1f} GMAC/s matmul, "
           f"{peaks['stream_bytes_per_s'] / 1e9:.1f} GB/s stream (enclave environment, "
           f"cores {peaks.get('cores') or 'unpinned'}); efficiency = roofline / measured",
           head, "-" * len(head)]
  for mname, m in report["models"].items():
    for name, r in m["backends"].items():
      roof = r.get("roofline")
      if not roof:
        continue
      for key, st in [*roof["stages"].items(), ("whole step", roof["whole_step"])]:
        got = st["trusted_compute_s"]
        lines.append(f"{mname:<9}{name:<10}{key:<14}{st['macs'] / 1e6:>10.1f}"
                     f"{st['bytes'] / 1e6:>9.2f}{st['roofline_s'] * 1e3:>12.3f}"
                     f"{_fmt(None if got is None else got * 1e3, '.3f'):>12}"
                     f"{_fmt(st['efficiency'], '.1%'):>8}")
  return lines


ROOFLINE_BACKENDS = ("enclave", RATIO_BASELINE)


def _roofline_bars(report: Mapping[str, Any], mname: str
                   ) -> tuple[list[str], list[float], list[float]]:
  """``(labels, measured s, roofline s)`` of the trusted stages of :data:`ROOFLINE_BACKENDS`."""
  rows = report["models"][mname]["backends"]
  labels, measured, roof = [], [], []
  for name in ROOFLINE_BACKENDS:
    figures = (rows.get(name) or {}).get("roofline")
    for key, st in (figures or {}).get("stages", {}).items():
      labels.append(f"{name} {key}")
      measured.append(st["trusted_compute_s"] or 0.0)
      roof.append(st["roofline_s"])
  return labels, measured, roof


def plot(report: Mapping[str, Any], path: str) -> None:
  """Stacked bars of the breakdown per backend, one panel per model (PNG).

  With roofline figures, a second row: measured trusted compute against the
  roofline time of every trusted stage of ``enclave`` and ``tee_only``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  models = list(report["models"])
  bars = max(len(_roofline_bars(report, m)[0]) for m in models)
  nrows = 2 if bars else 1
  fig, axes = plt.subplots(nrows, len(models), squeeze=False,
                           figsize=(max(4.5, 0.22 * bars) * len(models), 4 * nrows))
  for col, mname in enumerate(models):
    _breakdown_panel(axes[0][col], report, mname)
    if nrows == 2:
      _roofline_panel(axes[1][col], report, mname)
  axes[0][0].legend(fontsize=8)
  fig.suptitle("time per step; label: speed-up over tee_only (same run)", fontsize=10)
  fig.tight_layout()
  try:
    _save_atomic(fig, path)
  finally:
    plt.close(fig)


def _breakdown_panel(ax, report: Mapping[str, Any], mname: str) -> None:
  """One model's stacked breakdown bars, overlap beside, speed-up labels."""
  colours = {"trusted_compute_s": "#c0392b", "untrusted_compute_s": "#2980b9",
             "transfer_s": "#f39c12", "waiting_s": "#7f8c8d"}
  rows = report["models"][mname]["backends"]
  names = list(rows)
  x = np.arange(len(names))  # numeric positions: the overlap bars sit between them
  bottom = np.zeros(len(names))
  overlap = np.array([rows[n]["median"].get("overlap_s", 0.0) for n in names])
  for key in BREAKDOWN_KEYS:
    vals = np.array([rows[n]["median"][key] for n in names])
    label = key.replace("_s", "").replace("_", " ")
    if key == "trusted_compute_s":  # on the critical path; the overlapped part beside
      vals, label = vals - overlap, "trusted compute (critical path)"
    ax.bar(x, vals, bottom=bottom, color=colours[key], label=label)
    bottom += vals
  shown = overlap > 0
  if shown.any():  # beside its bar (bars span +-0.4): it ran during the untrusted compute
    ax.bar(x[shown] + 0.48, overlap[shown], width=0.12, color="#f5b7b1",
           edgecolor=colours["trusted_compute_s"], hatch="///",
           label="trusted, overlapped with untrusted")
  for i, n in enumerate(names):
    ax.text(i, bottom[i], f"{rows[n]['ratio_wall_vs_tee_only']:.1f}x", ha="center",
            va="bottom", fontsize=9)
  ax.set_xticks(x, names)
  ax.set_title(f"{mname} ({report['settings']['mode']}, "
               f"plan {report['models'][mname]['plan']['trusted_mac_ratio_forward']:.1f}x)")
  ax.set_ylabel("seconds per step (median)")


def _roofline_panel(ax, report: Mapping[str, Any], mname: str) -> None:
  """Measured against roofline time per trusted stage (log scale)."""
  labels, measured, roof = _roofline_bars(report, mname)
  x = np.arange(len(labels))
  ax.bar(x - 0.2, measured, width=0.4, color="#c0392b", label="measured trusted compute")
  ax.bar(x + 0.2, roof, width=0.4, color="#27ae60", label="roofline (peaks of enclave core)")
  if any(v > 0 for v in measured + roof):
    ax.set_yscale("log")
  ax.set_xticks(x, labels, rotation=90, fontsize=6)
  ax.set_ylabel("seconds per stage call")
  ax.set_title(f"{mname}: trusted stages vs roofline", fontsize=9)
  ax.legend(fontsize=7)


def _save_atomic(fig, path: str) -> None:
  """Writes ``fig`` as PNG to a temporary file next to ``path``, then renames it."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
