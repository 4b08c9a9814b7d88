"""What the estimator knows about accelerators and weight formats.

GPU specs come from ``configs/gpus.yaml`` (shipped inside the package as
``estimator/data/gpus.yaml``); a user file passed as ``extra`` is merged over it, entry by
entry and field by field, so a user can add a GPU or change only a price. The YAML is in
human units (GiB, GB/s, TFLOPS); :class:`GpuSpec` holds base units (bytes, bytes/s, FLOP/s).

Weight formats (``QUANTIZATIONS``): bytes per parameter and the arithmetic the matmuls run
in. Weight-only formats (int4 GPTQ/AWQ, int8 W8A16) dequantize to 16-bit and compute there;
``fp8`` (W8A8) computes in fp8 where the GPU has it; ``int8`` means W8A8 and uses int8 tensor
cores. ``fp32`` computes in TF32, taken as half the 16-bit tensor rate (A100, H100).

Errors::

    ValueError
    ├── CatalogError   a catalog file is unreadable or malformed (file, key path, reason)
    └── UnknownGpu     a key not in the catalog (lists the known keys)
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

GIB = 1 << 30

Compute = Literal["bf16", "fp8", "int8", "fp32"]


class CatalogError(ValueError):
    """A GPU catalog file is unreadable or malformed."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        super().__init__(f"{file}: {key}: {reason}")


class UnknownGpu(ValueError):
    """A GPU key that the catalog does not hold."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Quantization:
    """One weight format: storage cost and the arithmetic the matmuls run in.

    Bytes per quantized parameter = ``bits / 8 + scale_bytes_per_group / group``, where the
    group is ``group_size`` input rows, or the whole input dimension (``hidden_size``) for
    per-channel scales (``group_size=None``).
    """

    name: str
    bits: int
    group_size: int | None = None  # None: one scale per output channel
    scale_bytes_per_group: float = 0.0  # scale (+ packed zero point) per group and column
    compute: Compute = "bf16"
    embeddings_16bit: bool = True  # vLLM keeps embeddings and lm_head in 16-bit

    def bytes_per_param(self, hidden_size: int) -> float:
        group = self.group_size or hidden_size
        return self.bits / 8 + self.scale_bytes_per_group / group


_16BIT = Quantization(name="bf16", bits=16)
_INT4 = Quantization(
    # GPTQ / AWQ: 4-bit packed weights; per group of 128 input rows and per output column one
    # fp16 scale (2 B) and one 4-bit zero point packed into int32 (0.5 B): 0.5 + 2.5/128 B.
    name="int4",
    bits=4,
    group_size=128,
    scale_bytes_per_group=2.5,
)

QUANTIZATIONS: Mapping[str, Quantization] = {
    "auto": _16BIT,  # vLLM's default: the model's 16-bit dtype (fp32 configs are cast down)
    "bf16": _16BIT,
    "bfloat16": _16BIT,
    "fp16": Quantization(name="fp16", bits=16),
    "float16": Quantization(name="fp16", bits=16),
    "half": Quantization(name="fp16", bits=16),
    "fp32": Quantization(name="fp32", bits=32, compute="fp32", embeddings_16bit=False),
    "float32": Quantization(name="fp32", bits=32, compute="fp32", embeddings_16bit=False),
    # fp8 W8A8: per-tensor (or 128x128 block) fp32 scales, negligible next to the weights.
    "fp8": Quantization(name="fp8", bits=8, compute="fp8"),
    # int8 W8A8 (SmoothQuant / compressed-tensors): one fp32 scale per output channel.
    "int8": Quantization(name="int8", bits=8, scale_bytes_per_group=4.0, compute="int8"),
    "w8a8": Quantization(name="int8", bits=8, scale_bytes_per_group=4.0, compute="int8"),
    # int8 weight-only: one fp16 scale per output channel; computes in 16-bit.
    "w8a16": Quantization(name="w8a16", bits=8, scale_bytes_per_group=2.0),
    "int4": _INT4,
    "gptq": _INT4,
    "awq": _INT4,
    "w4a16": _INT4,
}


def get_quantization(name: str) -> Quantization:
    """The weight format called ``name`` (case-insensitive); ``ValueError`` lists the known."""
    try:
        return QUANTIZATIONS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(QUANTIZATIONS))
        raise ValueError(f"unknown quantization {name!r}; known: {known}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSpec:
    """One accelerator, in base units (bytes, bytes/s, FLOP/s, USD/hour)."""

    key: str
    name: str
    vendor: str
    memory_bytes: int
    mem_bandwidth_bps: float  # bytes/s
    bf16_flops: float  # dense 16-bit tensor FLOP/s
    fp8_flops: float | None  # dense fp8 FLOP/s; None where unsupported
    int8_ops: float | None  # dense int8 OP/s; None where unsupported
    interconnect: str
    interconnect_bps: float  # bytes/s, total bidirectional per GPU
    max_per_node: int
    price_per_hour: float  # USD per GPU-hour, on-demand
    price_source: str
    price_date: str

    def peak_flops(self, quant: str) -> float:
        """Dense peak FLOP/s for the matmuls of a model stored as ``quant``.

        fp8 uses the fp8 rate where the GPU has one, else 16-bit; ``int8`` (W8A8) uses the
        int8 rate where present; weight-only formats (int4, w8a16) compute in 16-bit; fp32
        computes in TF32 at half the 16-bit rate.
        """
        compute = get_quantization(quant).compute
        if compute == "fp8" and self.fp8_flops is not None:
            return self.fp8_flops
        if compute == "int8" and self.int8_ops is not None:
            return self.int8_ops
        if compute == "fp32":
            return self.bf16_flops / 2
        return self.bf16_flops


# field name -> (accepted types, may be null, scale to base units or None for non-numbers)
_FIELDS: Mapping[str, tuple[tuple[type, ...], bool, float | None]] = {
    "name": ((str,), False, None),
    "vendor": ((str,), False, None),
    "memory_gib": ((int, float), False, GIB),
    "memory_bandwidth_gbps": ((int, float), False, 1e9),
    "bf16_tflops": ((int, float), False, 1e12),
    "fp8_tflops": ((int, float), True, 1e12),
    "int8_tops": ((int, float), True, 1e12),
    "interconnect": ((str,), False, None),
    "interconnect_gbps": ((int, float), False, 1e9),
    "max_per_node": ((int,), False, None),
    "price_per_hour_usd": ((int, float), False, None),
    "price_source": ((str,), False, None),
    "price_date": ((str, datetime.date), False, None),  # unquoted YAML dates parse as dates
}


def default_catalog_path() -> Path:
    """The packaged GPU catalog (a copy of ``configs/gpus.yaml``)."""
    return Path(str(resources.files("estimator").joinpath("data", "gpus.yaml")))


def load_gpu_catalog(
    path: str | Path | None = None, *, extra: str | Path | None = None
) -> dict[str, GpuSpec]:
    """Load the GPU catalog at ``path`` (None: the packaged one), with ``extra`` merged over it.

    Entries of ``extra`` with a key already present override only the fields they give; new
    keys must give every field. Raises :class:`CatalogError` naming file, key path and reason.
    """
    base_file = Path(path) if path is not None else default_catalog_path()
    raw = {k: (dict(v), str(base_file)) for k, v in _read_entries(base_file).items()}
    if extra is not None:
        for key, fields in _read_entries(Path(extra)).items():
            merged = {**raw[key][0], **fields} if key in raw else dict(fields)
            raw[key] = (merged, str(extra))
    return {key: _parse_gpu(key, fields, file) for key, (fields, file) in raw.items()}


_GENERATIONS: tuple[tuple[str, str], ...] = (
    # (substring of the GPU's name or key, generation), first match wins
    ("b200", "blackwell"),
    ("gb200", "blackwell"),
    ("h100", "hopper"),
    ("h200", "hopper"),
    ("gh200", "hopper"),
    ("h20", "hopper"),
    ("l40", "ada"),
    ("l4", "ada"),
    ("4090", "ada"),
    ("a100", "ampere"),
    ("a10", "ampere"),
    ("a30", "ampere"),
    ("a40", "ampere"),
    ("t4", "turing"),
    ("v100", "volta"),
    ("mi300", "cdna3"),
    ("mi325", "cdna3"),
)


def gpu_generation(gpu: GpuSpec) -> str:
    """The accelerator's architecture generation (``hopper``, ``ampere``, ``ada``, ``blackwell``,
    ``turing``, ``volta``, ``cdna3``), ``cpu`` for generic (CPU) entries, else ``unknown``.

    Engine profiles (``estimator.engines``) key their efficiencies by it: the same engine reaches
    different fractions of the datasheet peaks on different generations (kernels, FP8 support).
    """
    if gpu.vendor == "generic" or gpu.key == "cpu":
        return "cpu"
    text = f"{gpu.key} {gpu.name}".lower()
    for needle, generation in _GENERATIONS:
        if needle in text:
            return generation
    return "unknown"


def get_gpu(catalog: Mapping[str, GpuSpec], key: str) -> GpuSpec:
    """The GPU ``key`` (case-insensitive); :class:`UnknownGpu` lists the known keys."""
    spec = catalog.get(key) or catalog.get(key.lower())
    if spec is None:
        known = ", ".join(sorted(catalog))
        raise UnknownGpu(f"unknown GPU {key!r}; known: {known}")
    return spec


def _read_entries(file: Path) -> dict[str, Mapping[str, Any]]:
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(str(file), "<file>", f"cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(str(file), "<file>", f"invalid YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise CatalogError(str(file), "<root>", "expected a mapping with a 'gpus' key")
    unknown = sorted(set(doc) - {"gpus"})
    if unknown:
        raise CatalogError(str(file), str(unknown[0]), "unknown field (expected only 'gpus')")
    gpus = doc.get("gpus")
    if not isinstance(gpus, Mapping):
        raise CatalogError(str(file), "gpus", "missing or not a mapping of GPU key to fields")
    for key, fields in gpus.items():
        if not isinstance(key, str) or not key:
            raise CatalogError(str(file), f"gpus.{key}", "GPU key must be a non-empty string")
        if not isinstance(fields, Mapping):
            raise CatalogError(str(file), f"gpus.{key}", "expected a mapping of fields")
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise CatalogError(str(file), f"gpus.{key}.{unknown[0]}", "unknown field")
    return dict(gpus)


def _check_field(key: str, name: str, value: Any, file: str) -> Any:
    types, nullable, _ = _FIELDS[name]
    where = f"gpus.{key}.{name}"
    if value is None:
        if nullable:
            return None
        raise CatalogError(file, where, "must not be null")
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise CatalogError(file, where, f"expected {want}, got {type(value).__name__} {value!r}")
    if isinstance(value, int | float) and (not math.isfinite(value) or value < 0):
        raise CatalogError(file, where, f"must be a finite number >= 0, got {value!r}")
    if name in {"memory_gib", "memory_bandwidth_gbps", "bf16_tflops", "max_per_node"} and (
        value == 0
    ):
        raise CatalogError(file, where, "must be > 0")
    return value


def _parse_gpu(key: str, fields: Mapping[str, Any], file: str) -> GpuSpec:
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise CatalogError(file, f"gpus.{key}.{missing[0]}", "missing field")
    v = {name: _check_field(key, name, fields[name], file) for name in _FIELDS}

    def scaled(name: str) -> float | None:
        value, scale = v[name], _FIELDS[name][2]
        return None if value is None else float(value) * (scale or 1.0)

    return GpuSpec(
        key=key,
        name=v["name"],
        vendor=v["vendor"],
        memory_bytes=round(v["memory_gib"] * GIB),
        mem_bandwidth_bps=float(scaled("memory_bandwidth_gbps") or 0.0),
        bf16_flops=float(scaled("bf16_tflops") or 0.0),
        fp8_flops=scaled("fp8_tflops"),
        int8_ops=scaled("int8_tops"),
        interconnect=v["interconnect"],
        interconnect_bps=float(scaled("interconnect_gbps") or 0.0),
        max_per_node=v["max_per_node"],
        price_per_hour=float(v["price_per_hour_usd"]),
        price_source=v["price_source"],
        price_date=str(v["price_date"]),
    )
