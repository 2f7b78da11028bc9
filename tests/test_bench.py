import numpy as np
import onnx
import onnxruntime as ort
import torch
from helpers import op_types

from fxcompress.bench import format_rows, gemm_to_matmul, run_benchmark
from fxcompress.export.writer import export_onnx
from fxcompress.graph.capture import capture
from fxcompress.models import zoo


def test_gemm_to_matmul_is_numerically_identical(tmp_path):
    model, (x,) = zoo.mlp()
    path = export_onnx(capture(model, (x,)).graph_module, (x,), tmp_path / "fp32.onnx")
    assert "Gemm" in op_types(path)
    rewritten = gemm_to_matmul(onnx.load(str(path)))
    assert "Gemm" not in [n.op_type for n in rewritten.graph.node]
    feeds = {"input": x.numpy()}
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    name = a.get_inputs()[0].name
    np.testing.assert_allclose(
        a.run(None, {name: feeds["input"]})[0], b.run(None, {name: feeds["input"]})[0], rtol=1e-5, atol=1e-5
    )


def test_benchmark_puts_fxcompress_and_ort_quantizers_in_one_table():
    calibration = [(torch.randn(8, 64),) for _ in range(2)]
    rows = run_benchmark(
        zoo.mlp,
        recipes=("int4:block=32,algo=gptq",),
        targets=("cpu",),
        batches=(1,),
        repeat=2,
        provider="cpu",
        ort_quantize_dynamic=False,
        ort_nbits=("rtn",),
        calibration=calibration,
    )
    names = [r.variant for r in rows]
    assert names == ["fp32", "fxcompress int4:block=32,algo=gptq [cpu]", "ORT MatMulNBitsQuantizer RTN int4 b32"]
    assert all(r.provider == "CPUExecutionProvider" and r.cosine > 0.99 for r in rows)
    assert rows[-1].weight_bytes < 0.3 * rows[0].weight_bytes  # ORT's int4 really quantized the (rewritten) MatMuls
    table = format_rows(rows)
    assert table.count("\n") == len(rows) + 1 and "CPU" in table


def test_side_by_side_timing_keeps_both_sessions_from_spinning(tmp_path, monkeypatch):
    """Two sessions in one process on few cores: a session whose threads spin after its runs slows the other one's
    (measured: a model timed against itself read 0.86), so both are made without spinning."""
    from fxcompress.checker.timing import relative_latency

    x = torch.randn(2, 8)
    path = export_onnx(torch.nn.Linear(8, 4), (x,), tmp_path / "m.onnx")
    made = []
    real = ort.InferenceSession

    def recording(model, options=None, **kwargs):
        made.append(None if options is None else options.get_session_config_entry("session.intra_op.allow_spinning"))
        return real(model, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    timed = relative_latency(path, path, [x.numpy()], "cpu", rounds=1, runs=1)
    assert made == ["0", "0"] and timed.ratio > 0 and timed.provider == "CPUExecutionProvider"
