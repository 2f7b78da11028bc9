"""What passes share: quantization grids, GPTQ, layer sensitivity under a byte budget, calibration statistics (input
Hessians, the output side of K-FAC), the joint refit of factorized blocks, and the distillation loop. A pass reaches
these, never into another pass."""
