"""bf16 training with float32 master weights: the model computes in bf16, AdamW updates float32 copies.

Autocast keeps float32 weights and casts every weight to bf16 in every forward (and the gradients back), which
costs copies at every step. Here the model's parameters *are* bf16, so forward and backward run without casts;
the optimizer keeps a float32 master copy of each parameter with float32 moments, adds each step's update there,
and writes the rounded result back into the bf16 parameter. Small updates therefore accumulate in float32
instead of vanishing below bf16's 8-bit mantissa (Micikevicius et al., "Mixed precision training", 2018).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """torch's AdamW over float32 masters of the (bf16) parameters it is given.

    `param_groups` hold the masters, so learning-rate schedulers and the Trainer work unchanged. Gradients are
    read from the model's parameters (upcast at `step`), and `state_dict` carries the masters, so a checkpoint
    resumes with the exact float32 weights."""

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.nn.Parameter] = []
        master_groups = []
        for group in groups:
            owned = list(group["params"])
            self.model_params.extend(owned)
            masters = [p.detach().to(torch.float32, copy=True) for p in owned]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for param, master in zip(self.model_params, self.masters):
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
        loss = super().step(closure)
        for param, master in zip(self.model_params, self.masters):
            param.copy_(master)
            master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["masters"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        if masters is not None:
            with torch.no_grad():
                for param, master, saved in zip(self.model_params, self.masters, masters):
                    master.copy_(saved)
                    param.copy_(master)

    @torch.no_grad()
    def write_masters(self, masters: list[torch.Tensor] | None = None) -> None:
        """Make the model float32 again and load the masters (or `masters`, e.g. a best checkpoint's) into it."""
        for param, master in zip(self.model_params, masters if masters is not None else self.masters):
            param.data = master.detach().to(param.device, torch.float32, copy=True)
