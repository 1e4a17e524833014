"""Ship the single network calibrated: the temperature fitted on validation, folded into its last
layer (docs/method.md §8).

Temperature scaling (Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks.
ICML 2017. https://arxiv.org/abs/1706.04599) divides the logits by one T fitted on held-out
images; accuracy does not change. When the logits are the output of a Linear layer, z = Wx + b,
dividing W and b by T gives z / T with no extra operation, so the network users export is
calibrated as it stands. A network whose output is not its last Linear layer's is left as it is
(checked on a probe batch), and the report says so.
"""

from __future__ import annotations

import torch
from torch import nn

from ensc.evaluation.metrics import EPS, fit_temperature


def last_linear(net: nn.Module) -> nn.Linear | None:
    """The last nn.Linear registered in ``net`` (the classifier of ensc's architectures, timm's
    and torchvision's), or None."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@torch.no_grad()
def fold_temperature(net: nn.Module, temperature: float, probe: torch.Tensor) -> bool:
    """Divide ``net``'s logits by ``temperature`` through its last Linear layer, in place.

    Checked on ``probe``: when the new logits are not the old ones over T (the layer is not the
    output), the weights are put back and False returned.
    """
    head = last_linear(net)
    if head is None:
        return False
    before = net(probe).float()
    saved = [p.detach().clone() for p in (head.weight, head.bias) if p is not None]
    for p in (head.weight, head.bias):
        if p is not None:
            p.div_(temperature)
    if torch.allclose(net(probe).float(), before / temperature, rtol=1e-4, atol=1e-5):
        return True
    for p, old in zip([p for p in (head.weight, head.bias) if p is not None], saved, strict=True):
        p.copy_(old)
    return False


def calibrate(
    net: nn.Module, avg_val: torch.Tensor, val_labels: torch.Tensor, probe: torch.Tensor
) -> dict[str, float | bool]:
    """Fit T on the single network's validation probabilities ``avg_val`` and fold it into
    ``net``; returns report["calibration"]: ``temperature`` (the fitted T) and ``folded`` (False:
    ``net`` is unchanged, its output is not a Linear layer's). The caller predicts again with the
    folded network, so that the report's numbers are those of the file users get."""
    t = fit_temperature(avg_val.clamp_min(EPS).log(), val_labels)
    return {"temperature": t, "folded": fold_temperature(net, t, probe)}
