"""GPTQ's column loop in float64 against float32 (the reference GPTQ's precision): time and the layer's relative
output error tr(dW H dW^T) / tr(W H W^T) on one square weight with uneven, outlier-bearing inputs.

Run: python benchmarks/experiments/gptq_precision.py 2048; ... 4096
2026-12-03, AMD EPYC AVX-512 VNNI, 2 threads, torch 2.13.0+cpu (seconds; error):

| width | form | float64 | float32 |
| --- | --- | --- | --- |
| 2048 | int4 block 64 | 1.4 s, 6.1353e-03 | 1.0 s, 6.1353e-03 |
| 2048 | int4 block 64, act_order | 1.4 s, 2.8473e-03 | 1.1 s, 2.8474e-03 |
| 2048 | int8 per channel | 1.2 s, 5.0440e-05 | 1.0 s, 5.0442e-05 |
| 4096 | int4 block 64 | 7.3 s, 4.3784e-03 | 6.0 s, 4.3783e-03 |
| 4096 | int4 block 64, act_order | 6.8 s, 6.8316e-04 | 4.8 s, 6.8315e-04 |
| 4096 | int8 per channel | 5.8 s, 3.9120e-05 | 4.5 s, 3.9121e-05 |

The same error to 4-5 digits, 18-30% less time: float32 became the default (``gptq.WORK_DTYPE``). End to end on
MiniLM (64 sentences, cosine in torch; builds timed float32, float64, float32 in one process): int4 GPTQ act_order
0.979648 (float32) vs 0.979601 (float64), 9.1 / 10.5 s vs 11.7 s; int8 GPTQ 0.999668 vs 0.999684, 11.2 / 11.6 s vs
14.8 s. A third of what is
left at 4096 is the inverse Hessian's float64 factorization (py-spy), kept in float64 for conditioning.
"""

import sys
import time
import warnings

import torch

from fxcompress.algorithms import gptq as G
from fxcompress.algorithms.quant import dequantize_blocks, quantize_gptq, quantize_per_channel_gptq

warnings.simplefilter("ignore")
torch.manual_seed(0)
torch.set_num_threads(2)
n = k = int(sys.argv[1]) if len(sys.argv) > 1 else 3072
x = torch.randn(2048, k) * torch.linspace(0.1, 3, k)  # uneven input scales, like activations
x[:, :8] *= 20  # a few outlier features
w = torch.randn(n, k) * 0.02
h = 2 * x.T @ x / len(x)


def error(w_hat: torch.Tensor) -> float:
    d, hd, wd = (w - w_hat).double(), h.double(), w.double()
    return float(torch.einsum("ik,kl,il->", d, hd, d) / torch.einsum("ik,kl,il->", wd, hd, wd))


for dtype in (torch.float64, torch.float32):
    G.WORK_DTYPE = dtype
    for act in (False, True):
        t0 = time.perf_counter()
        codes, s, z = quantize_gptq(w, h, 64, act_order=act)
        seconds = time.perf_counter() - t0
        print(
            f"int4 b64 {dtype} act_order={act}: {seconds:.1f} s, error {error(dequantize_blocks(codes, s, z, 64)):.4e}"
        )
    t0 = time.perf_counter()
    q, s8 = quantize_per_channel_gptq(w, h)
    seconds = time.perf_counter() - t0
    print(f"int8 {dtype}: {seconds:.1f} s, error {error(q.float() * s8[:, None]):.4e}")
