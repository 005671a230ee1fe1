"""Named model shapes (the ``--longctx-shape`` presets) and parsing of custom ones.

A shape is a CacheSpec template: the suite replaces max_positions and kv_dtype
per case. Values are from the models' public configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping

from .errors import SpecError
from .spec import CacheSpec, RopeSpec

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Phi-3-mini-128k-instruct's LongRoPE rescale factors (48 values: head_dim 96 / 2).
_PHI3_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
)
_PHI3_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0699999332427979, 1.0999999046325684, 1.1099998950958252,
    1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
    1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713,
    2.5899994373321533, 2.729999542236328, 2.749999523162842, 2.8399994373321533,
)

DEFAULT_SHAPE = "qwen3-0.6b"

SHAPES: Dict[str, CacheSpec] = {
    "qwen3-0.6b": CacheSpec(28, 16, 8, 128, 40960, rope=RopeSpec(theta=1e6)),
    "llama-3.1-8b": CacheSpec(
        32, 32, 8, 128, 131072,
        rope=RopeSpec(
            kind="llama3", theta=500000.0, factor=8.0, original_max_positions=8192,
            low_freq_factor=1.0, high_freq_factor=4.0,
        ),
    ),
    "qwen2.5-7b": CacheSpec(28, 28, 4, 128, 32768, rope=RopeSpec(theta=1e6)),
    # Gemma 3 1B's local (sliding) layers, 5 of every 6: theta 1e4, window 512.
    "gemma3-1b": CacheSpec(26, 4, 1, 256, 32768, rope=RopeSpec(theta=10000.0), sliding_window=512),
    "mistral-7b-v0.1": CacheSpec(32, 32, 8, 128, 32768, rope=RopeSpec(theta=10000.0), sliding_window=4096),
    "phi-3-mini-128k": CacheSpec(
        32, 32, 32, 96, 131072,
        rope=RopeSpec(
            kind="longrope", theta=10000.0, factor=32.0, original_max_positions=4096,
            short_factor=_PHI3_SHORT, long_factor=_PHI3_LONG,
        ),
    ),
    # The 7B simulation of realizar's ticket PERF-011 (github.com/paiml/realizar).
    "7b-sim": CacheSpec(32, 32, 32, 128, 16384, rope=RopeSpec(theta=10000.0)),
}

_CACHE_FIELDS = {f.name: f for f in dataclasses.fields(CacheSpec) if f.name != "rope"}
_ROPE_FIELDS = {f.name: f for f in dataclasses.fields(RopeSpec)}


def _coerce(key: str, value: Any) -> Any:
    """Turn a string from an inline list into the type the field wants."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in ("none", "null", ""):
        return None
    if key in ("kind", "style", "kv_dtype"):
        return text
    if key in ("short_factor", "long_factor"):
        return tuple(float(x) for x in text.strip("[]()").replace(";", " ").split())
    try:
        return int(text)
    except ValueError:
        return float(text)


def shape_from_mapping(values: Mapping[str, Any], *, source: str = "shape") -> CacheSpec:
    """A CacheSpec from CacheSpec and RopeSpec field names; unnamed fields keep the base's.

    The base is the preset named by ``base`` (default qwen3-0.6b). A nested
    ``rope`` table is accepted too.
    """
    flat = dict(values)
    flat.update(flat.pop("rope", None) or {})
    base_name = flat.pop("base", DEFAULT_SHAPE)
    if base_name not in SHAPES:
        raise SpecError(f"{source}: base={base_name!r} is not a known shape ({', '.join(SHAPES)})")
    cache_changes: Dict[str, Any] = {}
    rope_changes: Dict[str, Any] = {}
    for key, value in flat.items():
        try:
            coerced = _coerce(key, value)
        except ValueError:
            raise SpecError(f"{source}: {key}={value!r} is not a number") from None
        if key in _CACHE_FIELDS:
            cache_changes[key] = coerced
        elif key in _ROPE_FIELDS:
            rope_changes[key] = coerced
        else:
            known = ", ".join(sorted(set(_CACHE_FIELDS) | set(_ROPE_FIELDS)))
            raise SpecError(f"{source}: unknown key {key!r}; known keys: {known}")
    base = SHAPES[base_name]
    try:
        rope = dataclasses.replace(base.rope, **rope_changes)
        return dataclasses.replace(base, rope=rope, **cache_changes)
    except SpecError as exc:
        raise SpecError(f"{source}: {exc}") from None


def parse_shape(text: str) -> CacheSpec:
    """A preset name, a TOML or JSON file, or an inline ``key=value,...`` list."""
    text = text.strip()
    if text in SHAPES:
        return SHAPES[text]
    if text.endswith((".toml", ".json")) or os.path.isfile(text):
        return _shape_from_file(text)
    if "=" in text:
        values: Dict[str, str] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise SpecError(f"shape item {item!r} is not key=value")
            values[key.strip()] = value
        return shape_from_mapping(values, source="inline shape")
    raise SpecError(
        f"shape {text!r} is not a preset ({', '.join(SHAPES)}), a .toml/.json file or key=value list"
    )


def _shape_from_file(path: str) -> CacheSpec:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise SpecError(f"shape file {path}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            values = json.loads(raw)
        else:
            values = tomllib.loads(raw.decode())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"shape file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise SpecError(f"shape file {path}: should hold a table of CacheSpec/RopeSpec fields")
    return shape_from_mapping(values, source=f"shape file {path}")
