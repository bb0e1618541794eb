"""Muon (Jordan et al. 2024, the form airbench94_muon uses): momentum whose update for each 4-D conv
filter bank is orthogonalized by a Newton-Schulz iteration, every other parameter stepped by SGD.

One optimizer holds both, so the LR schedule, last.pt and resume treat it like any other: a parameter
group with `"muon": True` takes the Muon rule, the others SGD with (Nesterov) momentum and weight decay.
"""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd

# The quintic Newton-Schulz coefficients of Muon: chosen to push every singular value of the normalized
# matrix towards ~1 in few steps (they land in about [0.7, 1.2] rather than exactly 1, which is enough).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3  # airbench94_muon's count (Muon for language models uses 5)


def orthogonalize(matrix: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix U V^T of `matrix` = U S V^T (rows x columns), in float32."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    x = x / (x.norm() + eps)  # every singular value <= 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:
        x = x.T
    for _ in range(steps):  # x = a x + (b G + c G G) x with G = x x^T, each line one fused matmul
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Groups with `muon: True` (4-D filters): momentum buffer m = momentum m + g, the step direction
    (Nesterov: g + momentum m, else m) reshaped to (filters, inputs x k x k) and orthogonalized; each
    filter bank is first rescaled to Frobenius norm sqrt(filters) (so weight decay has no part in it),
    then moved by lr x the direction. Other groups: torch's SGD step (momentum, nesterov, weight_decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "muon": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._sgd_step(group)

    def _buffer(self, p: torch.Tensor, grad: torch.Tensor, momentum: float) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()  # torch SGD's first step: the buffer is the gradient
        else:
            state["momentum_buffer"].mul_(momentum).add_(grad)
        return state["momentum_buffer"]

    def _muon_step(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            buf = self._buffer(p, grad, group["momentum"])
            direction = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            update = orthogonalize(direction.reshape(len(direction), -1)).view(direction.shape)
            p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
            p.add_(update.to(p.dtype), alpha=-group["lr"])

    def _sgd_step(self, group: dict) -> None:
        """torch's SGD over the whole group at once (its foreach form, as SGD.step takes on a GPU)."""
        params = [p for p in group["params"] if p.grad is not None]
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(params, [p.grad for p in params], buffers, foreach=True, weight_decay=group["weight_decay"],
            momentum=momentum, lr=group["lr"], dampening=0.0, nesterov=group["nesterov"], maximize=False)
        if momentum:
            for p, buffer in zip(params, buffers):  # the first step's buffers are made by sgd()
                self.state[p]["momentum_buffer"] = buffer
