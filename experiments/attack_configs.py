"""What the leakage and attack scripts share (DESIGN section 7): no absl flags here.

``experiments/leakage.py``, ``experiments/attack_inversion.py`` and
``experiments/attack_gradient.py`` define flags of the same names, so they
cannot import each other; they import this module instead: the grammar of
their ``--configs`` flag and the grid figure of originals and reconstructions.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np

DEFAULT_CONFIGS = "dense,asymml_r1,asymml_r2,asymml_r4,asymml_dp_eps8"
DP_CONFIG_MODULE = "experiments.configs.mnist_dp"
RANK = re.compile(r"^asymml_r(\d+)$")
DP = re.compile(r"^asymml_dp_eps([0-9]*\.?[0-9]+)$")


def parse_names(text: str, flag: str, check: Callable[[str], None], what: str,
                example: str) -> tuple[str, ...]:
  """A comma list of names for ``--flag``: stripped, lower-cased, each passed to
  ``check`` (which raises ``ValueError``); empty parts skipped, repeats refused."""
  out: list[str] = []
  for part in str(text).split(","):
    part = part.strip().lower()
    if not part:
      continue
    check(part)
    if part in out:
      raise ValueError(f"--{flag}: {part!r} is listed twice")
    out.append(part)
  if not out:
    raise ValueError(f"--{flag}: give at least one {what} (e.g. {example})")
  return tuple(out)


def _check_config(part: str) -> None:
  m_rank, m_dp = RANK.match(part), DP.match(part)
  ok = (part == "dense" or (m_rank and int(m_rank.group(1)) >= 1)
        or (m_dp and float(m_dp.group(1)) > 0))
  if not ok:
    raise ValueError(f"--configs: unknown configuration {part!r}; use dense, "
                     "asymml_r<k> (k >= 1) or asymml_dp_eps<e> (e > 0)")


def parse_configs(text: str) -> tuple[str, ...]:
  """``"dense,asymml_r2,asymml_dp_eps8"`` -> names, each checked; repeats refused."""
  return parse_names(text, "configs", _check_config, "configuration", DEFAULT_CONFIGS)


def plot_grid(originals: np.ndarray, rows: Sequence[tuple[str, np.ndarray]], path: str, *,
              low: float, high: float, label_width: float = 1.6,
              label_fontsize: int = 8) -> None:
  """Originals in the first row, one row of reconstructions per configuration (PNG).

  Written to a temporary file next to ``path`` and renamed, so a reader never
  sees half a picture.  ``label_width`` (inches) leaves room for the row labels.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  all_rows = [("original", originals)] + list(rows)
  n_cols = len(originals)
  fig, axes = plt.subplots(len(all_rows), n_cols, squeeze=False,
                           figsize=(1.1 * n_cols + label_width, 1.15 * len(all_rows)))
  try:
    for i, (label, images) in enumerate(all_rows):
      for j in range(n_cols):
        ax = axes[i][j]
        ax.imshow(np.asarray(images[j])[..., 0], cmap="gray", vmin=low, vmax=high)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=label_fontsize)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
