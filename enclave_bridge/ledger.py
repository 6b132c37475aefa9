"""The boundary ledger: every tensor class that may cross the trust boundary (DESIGN section 2).

Each class has a direction, a shape rule and a protection.  The bridge tags
every tensor it moves with its class; both ends refuse a tensor whose class is
not declared for that direction (``protocol.UndeclaredTensor``), and
:class:`Traffic` counts what actually crossed, so tests can compare the two.
The README's threat-model table is generated from this module
(``python -m enclave_bridge.ledger``).
"""

from __future__ import annotations

import collections
import dataclasses
import sys

from enclave_bridge import protocol as pr

TO_UNTRUSTED = "enclave -> untrusted"
TO_ENCLAVE = "untrusted -> enclave"


@dataclasses.dataclass(frozen=True)
class TensorClass:
  """One declared kind of boundary traffic."""

  name: str
  direction: str
  shape_rule: str
  protection: str
  when: str
  what: str


LEDGER: dict[str, TensorClass] = {c.name: c for c in [
    TensorClass("activation_residual", TO_UNTRUSTED, "(B, H, W, C) of each split site",
                "low-rank residual R = X - U U^T X (the top principal channels stay in "
                "the enclave); per-sample clipped and Gaussian-noised when privacy is on",
                "forward, split sites", "input of the accelerator's convolution"),
    TensorClass("output_gradient_residual", TO_UNTRUSTED,
                "(B, Ho, Wo, Cout) of each split conv",
                "residual dY_R = dY - Q Q^T dY of the output gradient (its top principal "
                "output channels stay in the enclave); per-sample clipped (grad_clip) "
                "and Gaussian-noised when privacy is on",
                "training, gradient_protection=decompose (default)",
                "cotangent of the accelerator's convolution output"),
    TensorClass("output_gradient", TO_UNTRUSTED, "(B, Ho, Wo, Cout) of each split conv",
                "none: the full dY, as the reference implementation (its zero pattern "
                "reveals ReLU masks)", "training, gradient_protection=none",
                "cotangent of the accelerator's convolution output"),
    TensorClass("trusted_weight_gradient", TO_UNTRUSTED, "shape of each parameter",
                "aggregate over the batch, not noised (the enclave's share of dW: "
                "corr(X_L, dY) + corr(R, dY_L), and the normalisation/head gradients); "
                "not covered by epsilon", "training", "summed by the untrusted optimizer"),
    TensorClass("batch_statistics", TO_UNTRUSTED, "(C,) per BatchNorm layer",
                "aggregate over the batch (running means and variances)",
                "training with BatchNorm", "public model state"),
    TensorClass("loss", TO_UNTRUSTED, "scalar", "aggregate over the batch",
                "always", "the value being minimised"),
    TensorClass("metrics", TO_UNTRUSTED, "scalars (loss sum, correct, count)",
                "aggregate over the batch", "always", "progress and accuracy"),
    TensorClass("whole_gradient", TO_UNTRUSTED, "shape of each parameter",
                "aggregate over the batch", "tee_only backend",
                "all gradients of the TEE-only baseline"),
    TensorClass("site_ranks", TO_UNTRUSTED, "int32 scalar per split site",
                "rank_plan=fraction: a function of the architecture (public); "
                "rank_plan=calibrate: chosen once from the first batch's energy spectra, "
                "also visible in the enclave's timing, not covered by epsilon (refused "
                "with privacy on)", "on request (STATS), for the plan and benchmark tables",
                "the static rank each split site is compiled with"),
    TensorClass("public_weights", TO_ENCLAVE, "shape of each parameter",
                "public by design (architecture, weights, optimizer state)", "always",
                "weights the trusted stages need"),
    TensorClass("public_batch_stats", TO_ENCLAVE, "(C,) per BatchNorm layer",
                "public by design", "with BatchNorm", "running statistics for the stage"),
    TensorClass("conv_output_residual", TO_ENCLAVE, "(B, Ho, Wo, Cout) of each split conv",
                "derived from the released residual (no new leak); checked finite",
                "forward, split convs", "conv(R, W) from the accelerator"),
    TensorClass("residual_gradient", TO_ENCLAVE, "(B, H, W, C) of each split site",
                "derived from released tensors; checked finite", "training",
                "conv^T(dY_R, W) (conv^T(dY, W) without protection) from the accelerator"),
    TensorClass("loss_gradient", TO_ENCLAVE, "scalar", "public", "training",
                "cotangent of the loss"),
]}


def check(cls: str, direction: str) -> TensorClass:
  """The declared class, or :class:`protocol.UndeclaredTensor`."""
  c = LEDGER.get(cls)
  if c is None:
    raise pr.UndeclaredTensor(f"tensor class {cls!r} is not in the boundary ledger")
  if c.direction != direction:
    raise pr.UndeclaredTensor(f"tensor class {cls!r} may only cross {c.direction}")
  return c


def expected_classes(backend: str, *, train: bool, batch_norm: bool,
                     gradient_protection: str = "decompose") -> set[str]:
  """Classes a run of ``backend`` is declared to move (for traffic checks)."""
  if backend == "tee_only":
    out = {"metrics", "public_weights"}
    if batch_norm:
      out.add("public_batch_stats")
    if train:
      out |= {"whole_gradient", "loss"} | ({"batch_statistics"} if batch_norm else set())
    return out
  # Forward replies always carry the (possibly unchanged) statistics and, at the
  # last stage, the loss and metrics.
  out = {"activation_residual", "metrics", "loss", "public_weights", "conv_output_residual"}
  if batch_norm:
    out |= {"public_batch_stats", "batch_statistics"}
  if train:
    out |= {"trusted_weight_gradient", "residual_gradient", "loss_gradient"}
    out.add("output_gradient" if gradient_protection == "none"
            else "output_gradient_residual")
  return out


class Traffic:
  """Counts of tensors and bytes per class that crossed, per direction."""

  def __init__(self):
    self.count: collections.Counter = collections.Counter()
    self.bytes: collections.Counter = collections.Counter()

  def record(self, cls: str, nbytes: int) -> None:
    self.count[cls] += 1
    self.bytes[cls] += int(nbytes)

  def classes(self) -> set[str]:
    return set(self.count)

  def summary(self) -> list[dict]:
    return [{"class": c, "direction": LEDGER[c].direction if c in LEDGER else "?",
             "tensors": self.count[c], "bytes": self.bytes[c]} for c in sorted(self.count)]

  def table(self) -> str:
    lines = [f"{'tensor class':<24} {'direction':<22} {'tensors':>9} {'MB':>10}"]
    for row in self.summary():
      lines.append(f"{row['class']:<24} {row['direction']:<22} {row['tensors']:>9} "
                   f"{row['bytes'] / 1e6:>10.2f}")
    return "\n".join(lines)


def markdown_table() -> str:
  """The README's threat-model table."""
  lines = ["| tensor class | direction | shape | protection | when |",
           "| --- | --- | --- | --- | --- |"]
  for c in LEDGER.values():
    lines.append(f"| `{c.name}` | {c.direction} | {c.shape_rule} | {c.protection} | {c.when} |")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.stdout.write(markdown_table() + "\n")
