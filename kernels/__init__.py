"""fastspec.kernels: the model's fused ops — redshift-resample, attention pooling, the encoder's conv block —
with Triton kernels for CUDA, numba kernels for CPU and plain-torch references, registered as torch.library
custom ops.

Public API:
    resample(spec_rest, z, wave_rest, wave_obs) -> (spec_obs, valid)
    resample_loss(spec_rest, z, wave_rest, wave_obs, y, w, return_weight=False) -> (N,) [, (N,)]
    redshift_observed(spec_obs, z, z_new, wave_obs) -> (spec_new, valid)     # augmentation
    attention_pool(h, k) -> (N, C)
    instance_norm_prelu_pool(x, weight, pool=1, padding=0, eps=1e-5) -> (N, C, L_out)
    spectrum_conv_block(y, conv_weight, conv_bias, weight, pool=1, padding=0, eps=1e-5) -> (N, C, L_out)
    use_backend(name) / set_backend(name) / get_backend()
"""
from .backend import BACKENDS, get_backend, set_backend, use_backend

# op -> the module defining it; the ops import numba/triton, so they load on first use and `import fastspec`
# stays light.
_LAZY = {
    "resample": "resampling",
    "resample_loss": "resampling",
    "redshift_observed": "resampling",
    "attention_pool": "attention",
    "instance_norm_prelu_pool": "conv_block",
    "spectrum_conv_block": "conv_block",
}

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
