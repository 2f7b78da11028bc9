"""One artifact's latency relative to another's, timed in alternation so that both see the same machine.

A latency *ratio* from two separate timings is only as good as the quietest of them: on a shared 2-core machine a
neighbour's burst during the fp32 timing made an fp16 MiniLM look 0.47x fp32, while side by side it ran at 1.5x. So
the two sessions are loaded together and timed in alternating rounds, and the ratio is the median of the rounds'.
Neither session's threads spin between runs, so neither slows the other.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fxcompress.checker.runtime import choose_providers, import_ort


@dataclass(frozen=True)
class RelativeLatency:
    """``ratio`` = the artifact's per-round median over the reference's, medianed over rounds; both p50s in ms."""

    ratio: float
    p50_ms: float
    reference_p50_ms: float
    provider: str


def relative_latency(
    path: str | os.PathLike,
    reference: str | os.PathLike,
    inputs: Sequence[np.ndarray],
    provider: str = "auto",
    rounds: int = 7,
    runs: int = 5,
) -> RelativeLatency:
    """Time ``path`` against ``reference`` on the same ``inputs`` (one batch, in input order), alternating
    ``rounds`` rounds of ``runs`` runs each after a warm-up.

    Example:
        >>> from fxcompress.checker.parity import export_float
        >>> fp32 = export_float(model, x, "fp32.onnx")
        >>> timed = relative_latency("model.onnx", fp32, [x.numpy()], provider="cpu")
        >>> timed.provider, timed.ratio > 0
        ('CPUExecutionProvider', True)
    """
    ort = import_ort()
    providers = choose_providers(provider)
    # Worker threads that spin after a run (ORT's default) steal the cores from the other session's next runs: with
    # spinning on, an int8 MiniLM timed against itself read 0.86, and int8/fp32 read 0.42-0.61 with the order swapped
    # 0.34-0.37; with it off, 1.02 and 0.56-0.61 / 0.55-0.58 (2 cores, 2026-12-03).
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(p), options, providers=providers) for p in (path, reference)]
    feeds = [dict(zip((i.name for i in s.get_inputs()), inputs)) for s in sessions]
    for session, feed in zip(sessions, feeds):
        for _ in range(2):
            session.run(None, feed)
    per_round: list[tuple[float, float]] = []
    for _ in range(rounds):
        medians = []
        for session, feed in zip(sessions, feeds):
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times) * 1000)
        per_round.append((medians[0], medians[1]))
    return RelativeLatency(
        statistics.median(a / b for a, b in per_round),
        statistics.median(a for a, _ in per_round),
        statistics.median(b for _, b in per_round),
        sessions[0].get_providers()[0],
    )
