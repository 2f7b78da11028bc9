"""Experiment: which int8 weight encoding ORT's DynamicQuantizeMatMul runs faster on this CPU, uint8 (U8U8, the
``cpu`` target) or int8 (U8S8, the ``cpu-vnni`` target).

Run:  python benchmarks/experiments/experiment_int8_kernels.py      (~20 s; writes results/int8_kernels_<cpu>.md and .json)

One MiniLM-sized FFN matrix (K=384, N=1536) with the same codes both ways (q and q + 128 with zero point 128), one
thread, 32 and 1,024 rows (one sentence, a batch of 32), p50 of 50 runs, each encoding measured twice, interleaved.
U8S8 saturates its int16 sums on AVX2 CPUs without VNNI (why ``cpu`` writes uint8); with VNNI it does not.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import cpu_isa, environment, save_results

K, N, RUNS = 384, 1536, 50


def matmul(codes: np.ndarray, signed: bool) -> bytes:
    """One DynamicQuantizeMatMul over ``codes`` (int8, [K, N]) stored as int8 or as uint8 = q + 128."""
    weight = codes if signed else (codes.astype(np.int16) + 128).astype(np.uint8)
    zero_point = np.zeros(N, np.int8) if signed else np.full(N, 128, np.uint8)
    inits = [
        numpy_helper.from_array(weight, "B"),
        numpy_helper.from_array(np.full(N, 0.01, np.float32), "scale"),
        numpy_helper.from_array(zero_point, "zero_point"),
    ]
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "scale", "zero_point"], ["Y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString()


def p50_ms(session: ort.InferenceSession, x: np.ndarray) -> float:
    for _ in range(5):
        session.run(None, {"A": x})
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, {"A": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (K, N)).astype(np.int8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {
        signed: ort.InferenceSession(matmul(codes, signed), options, providers=["CPUExecutionProvider"])
        for signed in (False, True)
    }
    rows = []
    for n_rows in (32, 1024):
        x = rng.standard_normal((n_rows, K)).astype(np.float32)
        times = {False: [], True: []}
        for _ in range(2):
            for signed in (False, True):
                times[signed].append(p50_ms(sessions[signed], x))
        rows.append(dict(rows=n_rows, u8u8_ms=min(times[False]), u8s8_ms=min(times[True])))
    env = environment()
    lines = [
        f"# int8 GEMM kernels: uint8 vs int8 weights in DynamicQuantizeMatMul\n\n{env}\n",
        "Command: `python benchmarks/experiments/experiment_int8_kernels.py` (K=384, N=1536, 1 thread, p50 of 50 runs)\n",
        "| rows | uint8 weights, U8U8 (`cpu`) ms | int8 weights, U8S8 (`cpu-vnni`) ms | U8U8 / U8S8 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['rows']} | {r['u8u8_ms']:.3f} | {r['u8s8_ms']:.3f} | {r['u8u8_ms'] / r['u8s8_ms']:.2f} |" for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    isa = (cpu_isa() or "unknown-isa").lower().replace(",", "").replace(" ", "-")
    save_results(f"int8_kernels_{isa}", text, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
