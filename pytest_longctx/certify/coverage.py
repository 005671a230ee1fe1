"""Coverage: what a run exercised and what it did not, as ONNX's backend report lists operators.

A certificate that passes 40 cases at 4096 positions in float32 says nothing
about YaRN, gptj pairing, q8_0 or 131072 positions; this table says so. Each
value of each dimension gets the best it reached: passed, failed (a case with
it failed), skipped (cases existed but none was judged) or not exercised.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from ..questions import QUESTIONS
from ..spec import ATTENTION_FEATURES, KV_DTYPES, ROPE_KINDS, ROPE_STYLES

LADDER = (4096, 8192, 16384, 32768, 65536, 131072)

NOT_EXERCISED = "not exercised"
_RANK = {NOT_EXERCISED: 0, "skipped": 1, "passed": 2, "expected failure": 3, "failed": 4}


def _status(outcome: str) -> str:
    if outcome in ("failed", "error", "xpassed"):
        return "failed"
    if outcome == "xfailed":
        return "expected failure"
    return "passed" if outcome == "passed" else "skipped"


def _mark(table: Dict[str, str], value: Any, outcome: str) -> None:
    key, status = str(value), _status(outcome)
    if _RANK[status] > _RANK[table.get(key, NOT_EXERCISED)]:
        table[key] = status


def is_runtime_case(nodeid: str) -> bool:
    """A case of the whole-model runtime groups (conformance/test_runtime_*.py)."""
    return "test_runtime_" in nodeid.split("::", 1)[0]


def coverage(cases: Iterable[Any], settings: Any, claimed: Optional[Dict[str, List[str]]] = None) -> Dict[str, Any]:
    """Per backend: every dimension's values with their status; ``claimed`` maps backend to its kv dtypes."""
    shape_rope = settings.shape.rope
    out: Dict[str, Any] = {}
    for backend in settings.backends:
        positions = sorted(set(LADDER) | set(settings.positions))
        tables: Dict[str, Dict[str, str]] = {
            "question": {q: NOT_EXERCISED for q in QUESTIONS},
            "rope kind": {k: NOT_EXERCISED for k in ROPE_KINDS},
            "rope pairing": {p: NOT_EXERCISED for p in ROPE_STYLES},
            "attention feature": {f: NOT_EXERCISED for f in ATTENTION_FEATURES},
            "kv dtype": {d: NOT_EXERCISED for d in KV_DTYPES},
            "positions": {str(p): NOT_EXERCISED for p in positions},
        }
        runtime = False
        for case in cases:
            if case.backend != backend:
                continue
            runtime = runtime or is_runtime_case(case.nodeid)
            params = case.params
            if case.question in QUESTIONS:
                _mark(tables["question"], case.question, case.outcome)
            if case.kv_dtype:
                _mark(tables["kv dtype"], case.kv_dtype, case.outcome)
            if case.positions:
                _mark(tables["positions"], case.positions, case.outcome)
            if "kind" in params and "style" in params:
                _mark(tables["rope kind"], params["kind"], case.outcome)
                _mark(tables["rope pairing"], params["style"], case.outcome)
            elif case.question == "equivalence" and "feature" not in params and not runtime:
                # The shape's own RoPE, at every kv dtype and positions value.
                _mark(tables["rope kind"], shape_rope.kind, case.outcome)
                _mark(tables["rope pairing"], shape_rope.style, case.outcome)
            if "feature" in params:
                _mark(tables["attention feature"], params["feature"], case.outcome)
        claims = (claimed or {}).get(backend)
        notes = []
        if runtime:  # RoPE and attention features are the model's own, judged through its logits
            for name in ("rope kind", "rope pairing", "attention feature"):
                del tables[name]
            notes.append("a whole-model runtime: its RoPE and attention are the model's own, judged "
                         "through its logits; its kv dtype is the model's")
        if claims is not None:
            notes += [f"kv dtype {d} is not claimed by the backend" for d in KV_DTYPES if d not in claims]
        exercised = sum(v != NOT_EXERCISED for t in tables.values() for v in t.values())
        total = sum(len(t) for t in tables.values())
        out[backend] = {"dimensions": tables, "exercised": exercised, "total": total,
                        "claimed_kv_dtypes": claims, "notes": notes}
    return out
