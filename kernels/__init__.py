"""fastspec.kernels: fused redshift-resample and attention-pooling ops (Triton on GPU, numba on CPU,
plain-torch reference), registered as torch.library custom ops.

Public API:
    resample(spec_rest, z, wave_rest, wave_obs) -> (spec_obs, valid)
    resample_loss(spec_rest, z, wave_rest, wave_obs, y, w) -> (N,)
    redshift_observed(spec_obs, z, z_new, wave_obs) -> (spec_new, valid)     # augmentation
    attention_pool(h, k) -> (N, C)
    instance_norm_prelu_pool(x, weight, pool=1, padding=0, eps=1e-5) -> (N, C, L_out)
    spectrum_conv_block(y, conv_weight, conv_bias, weight, pool=1, padding=0, eps=1e-5) -> (N, C, L_out)
    use_backend(name) / set_backend(name) / get_backend()
"""
import sys
import types

from .backend import BACKENDS, get_backend, set_backend, use_backend

_LAZY = {
    "resample": "resample",
    "resample_loss": "resample",
    "redshift_observed": "resample",
    "attention_pool": "attention",
    "instance_norm_prelu_pool": "conv_block",
    "spectrum_conv_block": "conv_block",
}

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", *_LAZY]


def __getattr__(name):
    # Ops import numba/triton; load them on first use so `import fastspec` stays light.
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        # Importing submodule `resample` binds the package attribute `resample` to the module; rebind every
        # op of that module to its function so `fastspec.kernels.resample` stays the op after first use.
        for op, modname in _LAZY.items():
            if modname == _LAZY[name]:
                globals()[op] = getattr(mod, op)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # A direct `import fastspec.kernels.resample` (before any use of the op) would also bind the package
        # attribute to the submodule; keep the op's name for the op (the module stays in sys.modules).
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
