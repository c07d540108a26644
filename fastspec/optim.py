"""Adam for CPU training and latent refinement: what torch.optim.Adam computes (its single-tensor path, L2 weight
decay), without the first-use import of torch._dynamo that every torch.optim optimizer makes (their methods are
wrapped in torch._disable_dynamo) — about 150 MB and 0.7 s of a CPU process, for a compiler it never uses.

A torch.optim.Optimizer subclass, so torch's learning-rate schedulers and GradScaler drive it as usual, and its
state_dict has torch.optim.Adam's layout, so a checkpoint resumes with either class.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class Adam(torch.optim.Optimizer):
    """Adam(params, lr, betas, eps, weight_decay) on dense gradients; `params` is an iterable of tensors or, as
    for torch.optim, of parameter groups (dicts with "params" and any of the hyperparameters)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        # Not Optimizer.__init__: its add_param_group is one of the methods that import torch._dynamo.
        params = list(params)
        if not params:
            raise ValueError("Adam: no parameters to optimise")
        # the same group keys as torch.optim.Adam, so state_dicts are interchangeable
        self.defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                             maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                             decoupled_weight_decay=False)
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for g in groups:
            group = {**self.defaults, **g, "params": list(g["params"])}
            if not all(isinstance(p, torch.Tensor) for p in group["params"]):
                raise TypeError("Adam: params must be tensors or parameter groups of tensors")
            lr_, (b1, b2), eps_, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if not (lr_ >= 0 and eps_ >= 0 and wd >= 0 and 0 <= b1 < 1 and 0 <= b2 < 1):
                raise ValueError(f"Adam: invalid lr={lr_}, betas={(b1, b2)}, eps={eps_} or weight_decay={wd}")
            self.param_groups.append(group)
        self.state: defaultdict = defaultdict(dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)  # on the CPU, as torch keeps it
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                st["step"] += 1
                step = st["step"].item()
                st["exp_avg"].lerp_(grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                denom = st["exp_avg_sq"].sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
                p.addcdiv_(st["exp_avg"], denom, value=-step_size)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False)
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim.Optimizer's layout: state by parameter index, groups with `params` as indices."""
        index = {}
        groups = []
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [index[id(p)] for p in group["params"]]})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """From `state_dict` here or torch.optim.Adam's: moments onto each parameter's device and dtype."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("Adam.load_state_dict: the saved parameter groups do not match this optimizer's")
        params = {i: p for s, g in zip(saved, self.param_groups) for i, p in zip(s["params"], g["params"])}
        self.state = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: (v.to(dtype=torch.float32, device="cpu") if k == "step" else
                                 v.to(device=p.device, dtype=p.dtype)) for k, v in st.items()}
        for s, g in zip(saved, self.param_groups):
            g.update({k: v for k, v in s.items() if k != "params"})


__all__ = ["Adam"]
