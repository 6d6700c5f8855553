"""The OpenSora 1.2 CPU inference study. Sub-packages, lowest layer first: model, optim and measure, testbed,
experiments and report (see README "How the code is organised" and ``utils.imports``)."""
import logging

# Library start-up noise, explained here once instead of printed by every run: torchao 0.18 tries to load its CUDA
# kernels (_C_mxfp8, _C_cutlass_90a) and warns that they cannot load, as on any CPU-only machine; torch 2.13 warns
# that torchao registers two Enum classes with pytree the deprecated way; diffusers 0.42 warns that it cannot
# import torchao's float8/uint4 tensor classes, needed only to load torchao-serialised checkpoints (none here).
# Errors from these loggers still show.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
