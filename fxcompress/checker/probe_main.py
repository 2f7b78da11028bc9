"""Subprocess body of :func:`fxcompress.checker.runtime.probe`: load, measure RSS, run, time. Prints one JSON line."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

CUDA = "CUDAExecutionProvider"
CUDA_FAILED = (
    "the CUDA execution provider is installed (onnxruntime-gpu) but could not start: it needs the CUDA 13 and cuDNN 9 "
    "libraries on the library path (see ONNX Runtime's CUDA EP requirements)"
)


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # non-Linux: peak RSS is the best available proxy

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim() -> None:
    """Return freed heap pages to the OS (glibc) so RSS shows live memory, not what malloc keeps cached.

    Without it the number depends on allocator timing: a 5 x 4096^2 int8 model read 90 or 154 MiB after the
    same load, the difference being the initializers ORT freed after pre-packing them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    _trim()
    return _status_mb("VmRSS")


def _gpu_mem_mb(pid: int) -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


def save_optimized(spec: dict) -> None:
    """Save the graph ORT runs after its extended optimizations, weights in external data."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = spec["out"]
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(spec["model"], so, providers=spec["providers"])


def main(spec_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    spec = json.load(open(spec_path))
    if spec.get("mode") == "optimized_graph":
        save_optimized(spec)
        return
    with np.load(spec["inputs"]) as z:
        batches = [
            [z[k] for k in sorted((k for k in z.files if k.startswith(f"b{i}_")), key=lambda k: int(k.split("_")[1]))]
            for i in range(spec["n"])
        ]
    base = _rss_mb()
    so = ort.SessionOptions()
    if spec["threads"]:
        so.intra_op_num_threads = spec["threads"]
    # a GPU build without its CUDA / cuDNN libraries logs an error per missing library and falls back to the CPU:
    # keep the log quiet and say it once, in the report
    ort.set_default_logger_severity(4)
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(spec["model"], so, providers=spec["providers"])
    except Exception as exc:
        print(json.dumps({"error": f"ONNX Runtime could not load the model: {str(exc).strip().splitlines()[0][:500]}"}))
        return
    provider = sess.get_providers()[0]
    note = None
    if spec["providers"][0] == CUDA and provider != CUDA:
        if spec.get("strict"):
            print(json.dumps({"provider": provider, "error": CUDA_FAILED + "; --provider cuda asked for it: not run"}))
            return
        note = CUDA_FAILED + "; it ran on the CPU instead"
    load = _rss_mb()
    names = [i.name for i in sess.get_inputs()]
    outputs = {}
    try:
        for i, batch in enumerate(batches):
            if len(batch) != len(names):
                raise ValueError(f"model takes {len(names)} inputs {names}, got {len(batch)}")
            for k, y in enumerate(sess.run(None, dict(zip(names, batch)))):
                outputs[f"b{i}_{k}"] = y
        ran = _rss_mb()
        feed = dict(zip(names, batches[0]))
        for _ in range(spec["warmup"]):
            sess.run(None, feed)
        times = []
        for _ in range(spec["repeat"]):
            t = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t) * 1000)
    except Exception as exc:
        print(
            json.dumps(
                {
                    "provider": provider,
                    "error": f"ONNX Runtime failed to run the model: {str(exc).strip().splitlines()[0][:500]}",
                }
            )
        )
        return
    np.savez(spec["outputs"], **outputs)
    times.sort()
    gpu = _gpu_mem_mb(os.getpid()) if provider == "CUDAExecutionProvider" else None
    print(
        json.dumps(
            dict(
                provider=provider,
                n_outputs=len(sess.get_outputs()),
                rss_base_mb=base,
                rss_load_mb=load - base,
                rss_run_mb=ran - base,
                rss_peak_mb=_status_mb("VmHWM") - base,
                p50_ms=times[len(times) // 2] if times else None,
                p90_ms=times[int(len(times) * 0.9)] if times else None,
                gpu_mem_mb=gpu,
                note=note,
            )
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
