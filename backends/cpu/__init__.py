"""CPU kernels from PyTorch's own library, behind lcc's ops (installed as `lcc.backends.cpu`)."""
