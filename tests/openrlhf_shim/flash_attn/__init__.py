"""Pure-PyTorch stand-in for the parts of ``flash_attn`` OpenRLHF imports (tests only, no kernels)."""

__version__ = "2.8.3+cpushim"
