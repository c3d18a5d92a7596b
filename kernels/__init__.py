"""Continuous-output losses (Triton kernels + PyTorch references); imports as `pretrain_kernels`."""
