"""The four questions the suite answers, in their order, each with its one line.

Part of the contract (pure data): the suite marks its groups ``longctx_<question>``,
the certificate and the coverage table count cases per question, and the markers'
help lines are these lines. Listed here once, so that a fifth question is added in
one place.
"""

from __future__ import annotations

from typing import Dict

QUESTIONS: Dict[str, str] = {
    "limits": "context limits: holds exactly max_positions, refuses one more loudly, loses nothing",
    "memory": "KV memory: measured cache memory within the analytic size",
    "throughput": "fill and retrieve throughput, also as a fraction of memory bandwidth",
    "equivalence": "attention with RoPE matches the float64 reference at long positions",
}
