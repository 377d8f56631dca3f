"""Triton kernels (GPU, or CPU tensors under TRITON_INTERPRET=1), wrapped as opaque torch.library custom ops."""
