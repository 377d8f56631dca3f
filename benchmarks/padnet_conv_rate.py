"""How fast can the PAD-Net distillation module be on this CPU? Its 3x3 convolutions set the floor.

    python benchmarks/padnet_conv_rate.py

Prints the rate of a large matmul, of one source's stacked convolution (T=3: C=64 -> 4C, B=8,
60 x 80, as the fused module runs it) forward and forward+backward, and the GFLOP of the whole
module's convolutions at T=3 (the same for eager's 2T(T-1) separate convolutions and the fused
module's T stacked ones). Divided by the rates, that is the time no fusion of the rest can go under.
"""

import time

import torch
import torch.nn.functional as F


def median_s(fn, reps=7):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def main():
    T, B, C, H, W = 3, 8, 64, 60, 80
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    print(f"matmul 1024^3: {2 * 1024**3 / median_s(lambda: a @ b) / 1e9:.1f} GFLOP/s")
    x = torch.randn(B, C, H, W, requires_grad=True)
    w = torch.randn(2 * (T - 1) * C, C, 3, 3, requires_grad=True)
    flop = 2 * w.shape[0] * C * 9 * B * H * W  # one source's stacked convolution, forward
    with torch.no_grad():
        print(f"stacked conv forward: {flop / median_s(lambda: F.conv2d(x, w, padding=1)) / 1e9:.1f} GFLOP/s")
    grad = torch.randn(B, w.shape[0], H, W)

    def forward_backward():
        x.grad = w.grad = None
        F.conv2d(x, w, padding=1).backward(grad)

    rate = 3 * flop / median_s(forward_backward) / 1e9  # backward: input and weight gradients, 2x forward
    print(f"stacked conv forward+backward: {rate:.1f} GFLOP/s")
    total = 3 * T * flop / 1e9
    print(f"module's convolutions, T={T}, forward+backward: {total:.1f} GFLOP -> {total / rate * 1e3:.0f} ms at that rate")


if __name__ == "__main__":
    main()
