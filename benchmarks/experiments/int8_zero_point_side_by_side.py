"""The 84M MLP int8 (cpu-vnni) against ORT quantize_dynamic, timed side by side in one process
(fxcompress.checker.timing.relative_latency, 9 alternating rounds of 10 runs), and with an explicit int8 zero point for
B added to our DynamicQuantizeMatMul nodes (the one difference between the two graphs after ORT's optimizer).

Run: python benchmarks/experiments/int8_zero_point_side_by_side.py
2026-12-03, AMD EPYC AVX-512 VNNI, 2 threads, ORT 1.32.0: ours/ORT 0.983, ours+zp/ORT 0.988, ours+zp/ours 0.992: the
same speed; the 0.29x vs 0.22x of bench_planner.py --latency came from timing the variants one after another.
Rerun later that day with the sessions' spinning threads off (relative_latency's fix): 0.983, 0.999, 1.042.
"""

import warnings

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

import fxcompress
from fxcompress.checker.parity import export_float, onnx_feed
from fxcompress.checker.timing import relative_latency
from fxcompress.models import zoo

warnings.simplefilter("ignore")
model, x, *_ = zoo.big_mlp()
cm = fxcompress.optimize(model, x, recipe="int8")
ours = cm.export("/tmp/big_q.onnx", target="cpu-vnni")
p = onnx.load(str(ours))
for n in p.graph.node:
    if n.op_type == "DynamicQuantizeMatMul" and (len(n.input) < 4 or not n.input[3]):
        scale = next(t for t in p.graph.initializer if t.name == n.input[2])
        zp = numpy_helper.from_array(np.zeros(numpy_helper.to_array(scale).shape, np.int8), n.input[1] + "_zp")
        p.graph.initializer.append(zp)
        ins = list(n.input) + [""] * (5 - len(n.input))
        ins[3] = zp.name
        del n.input[:]
        n.input.extend(ins)
onnx.save(p, "/tmp/big_q_zp.onnx")
export_float(model, x, "/tmp/big_f.onnx")
quantize_dynamic("/tmp/big_f.onnx", "/tmp/big_o.onnx", weight_type=QuantType.QInt8, per_channel=True)
feed = list(onnx_feed(x))
for name, a, b in (
    ("ours vs ORT", "/tmp/big_q.onnx", "/tmp/big_o.onnx"),
    ("ours+zp vs ORT", "/tmp/big_q_zp.onnx", "/tmp/big_o.onnx"),
    ("ours+zp vs ours", "/tmp/big_q_zp.onnx", "/tmp/big_q.onnx"),
):
    r = relative_latency(a, b, feed, "cpu", rounds=9, runs=10)
    print(name, round(r.ratio, 3), round(r.p50_ms, 2), round(r.reference_p50_ms, 2))
