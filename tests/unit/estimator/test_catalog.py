"""GPU catalog: the packaged YAML, unit conversion, peak FLOPs per format, user overrides,
and error messages that name file, key path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from estimator.catalog import (
    GIB,
    QUANTIZATIONS,
    CatalogError,
    GpuSpec,
    UnknownGpu,
    default_catalog_path,
    get_gpu,
    get_quantization,
    load_gpu_catalog,
)

ROOT = Path(__file__).resolve().parents[3]
REQUIRED = [
    "t4",
    "l4",
    "a10g",
    "l40s",
    "a100-40gb",
    "a100-80gb",
    "h100-sxm",
    "h100-pcie",
    "h200",
    "b200",
    "mi300x",
    "cpu",
]

FULL_ENTRY = """\
    name: Test GPU
    vendor: acme
    memory_gib: 32
    memory_bandwidth_gbps: 1000
    bf16_tflops: 100
    fp8_tflops: null
    int8_tops: 200
    interconnect: PCIe Gen4 x16
    interconnect_gbps: 64
    max_per_node: 4
    price_per_hour_usd: 1.5
    price_source: test
    price_date: "2025-01"
"""


@pytest.fixture(scope="module")
def catalog() -> dict[str, GpuSpec]:
    return load_gpu_catalog()


def write(tmp_path: Path, text: str, name: str = "gpus.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_packaged_catalog_is_the_configs_file() -> None:
    packaged = default_catalog_path()
    assert packaged.read_bytes() == (ROOT / "configs" / "gpus.yaml").read_bytes()


@pytest.mark.parametrize("key", REQUIRED, ids=REQUIRED)
def test_required_gpus_are_present_and_sane(catalog: dict[str, GpuSpec], key: str) -> None:
    gpu = catalog[key]
    assert gpu.key == key
    assert gpu.memory_bytes >= 16 * GIB
    assert gpu.mem_bandwidth_bps >= 10e9
    assert gpu.bf16_flops > 0
    assert gpu.fp8_flops is None or gpu.fp8_flops >= gpu.bf16_flops
    assert gpu.int8_ops is None or gpu.int8_ops >= gpu.bf16_flops
    assert gpu.price_per_hour > 0
    assert gpu.price_source and gpu.price_date


DATASHEET = [
    # key, memory GiB, bandwidth B/s, bf16 FLOP/s, fp8 FLOP/s
    ("h100-sxm", 79.18, 3.35e12, 989e12, 1979e12),  # driver-reported total
    ("h200", 139.8, 4.8e12, 989e12, 1979e12),
    ("a100-80gb", 80, 2.039e12, 312e12, None),
    ("l4", 24, 300e9, 121e12, 242e12),
    ("mi300x", 192, 5.3e12, 1307e12, 2615e12),
]


@pytest.mark.parametrize(
    ("key", "gib", "bandwidth", "bf16", "fp8"), DATASHEET, ids=[d[0] for d in DATASHEET]
)
def test_units_are_converted_to_base_units(
    catalog: dict[str, GpuSpec],
    key: str,
    gib: float,
    bandwidth: float,
    bf16: float,
    fp8: float | None,
) -> None:
    gpu = catalog[key]
    assert gpu.memory_bytes == round(gib * GIB)
    assert gpu.mem_bandwidth_bps == pytest.approx(bandwidth)
    assert gpu.bf16_flops == pytest.approx(bf16)
    assert gpu.fp8_flops == (None if fp8 is None else pytest.approx(fp8))


PEAK = [
    ("h100-sxm", "bf16", 989e12),
    ("h100-sxm", "fp8", 1979e12),
    ("h100-sxm", "int8", 1979e12),  # W8A8 on int8 tensor cores
    ("h100-sxm", "int4", 989e12),  # weight-only: dequantize, compute in 16-bit
    ("h100-sxm", "awq", 989e12),
    ("h100-sxm", "w8a16", 989e12),
    ("a100-80gb", "fp8", 312e12),  # no fp8 on Ampere: 16-bit
    ("a100-80gb", "int8", 624e12),
    ("a100-80gb", "fp32", 156e12),  # TF32
    ("t4", "FP16", 65e12),
]


@pytest.mark.parametrize(("key", "quant", "flops"), PEAK, ids=[f"{k}-{q}" for k, q, _ in PEAK])
def test_peak_flops_per_format(
    catalog: dict[str, GpuSpec], key: str, quant: str, flops: float
) -> None:
    assert catalog[key].peak_flops(quant) == pytest.approx(flops)


def test_int4_bytes_per_param_is_documented_value() -> None:
    assert get_quantization("gptq").bytes_per_param(4096) == pytest.approx(0.5 + 2.5 / 128)
    assert get_quantization("int8").bytes_per_param(4096) == pytest.approx(1 + 4 / 4096)
    assert QUANTIZATIONS["fp8"].bytes_per_param(4096) == 1.0


def test_unknown_quantization_lists_known(catalog: dict[str, GpuSpec]) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'.*awq"):
        catalog["h100-sxm"].peak_flops("int3")


def test_get_gpu_is_case_insensitive_and_lists_known_keys(catalog: dict[str, GpuSpec]) -> None:
    assert get_gpu(catalog, "H100-SXM").key == "h100-sxm"
    with pytest.raises(UnknownGpu, match=r"unknown GPU 'h100'.*h100-pcie, h100-sxm"):
        get_gpu(catalog, "h100")


def test_extra_overrides_fields_and_adds_entries(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        "gpus:\n  h100-sxm:\n    price_per_hour_usd: 2.1\n    price_source: our contract\n"
        f"  test-gpu:\n{FULL_ENTRY}",
        "extra.yaml",
    )
    merged = load_gpu_catalog(extra=extra)
    base = load_gpu_catalog()
    assert merged["h100-sxm"].price_per_hour == 2.1
    assert merged["h100-sxm"].price_source == "our contract"
    assert merged["h100-sxm"].bf16_flops == base["h100-sxm"].bf16_flops
    assert merged["test-gpu"].memory_bytes == 32 * GIB
    assert merged["test-gpu"].fp8_flops is None
    assert set(base) < set(merged)


def test_unquoted_yaml_date_is_accepted(tmp_path: Path) -> None:
    text = f"gpus:\n  g:\n{FULL_ENTRY}".replace('"2025-01"', "2025-01-31")
    assert load_gpu_catalog(write(tmp_path, text))["g"].price_date == "2025-01-31"


ERRORS = [
    # (id, yaml text, key path in the message, reason fragment)
    ("missing-field", FULL_ENTRY.replace("    memory_gib: 32\n", ""), "gpus.g.memory_gib", "missing"),
    ("wrong-type", FULL_ENTRY.replace("32", "lots"), "gpus.g.memory_gib", "expected int or float"),
    ("bool", FULL_ENTRY.replace("max_per_node: 4", "max_per_node: true"), "gpus.g.max_per_node",
     "expected int"),
    ("negative", FULL_ENTRY.replace("1.5", "-1"), "gpus.g.price_per_hour_usd", ">= 0"),
    ("zero-memory", FULL_ENTRY.replace("32", "0"), "gpus.g.memory_gib", "> 0"),
    ("null-required", FULL_ENTRY.replace("bf16_tflops: 100", "bf16_tflops: null"),
     "gpus.g.bf16_tflops", "must not be null"),
    ("unknown-field", FULL_ENTRY + "    hbm_stacks: 6\n", "gpus.g.hbm_stacks", "unknown field"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "reason"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_entry_errors_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, f"gpus:\n  g:\n{text}")
    with pytest.raises(CatalogError) as info:
        load_gpu_catalog(path)
    assert info.value.file == str(path)
    assert info.value.key == key
    assert reason in str(info.value)
    assert str(path) in str(info.value)


FILE_ERRORS = [
    ("invalid-yaml", "gpus: [unclosed", "<file>", "invalid YAML"),
    ("not-a-mapping", "- a\n- b\n", "<root>", "expected a mapping"),
    ("no-gpus", "gpu:\n  a: 1\n", "gpu", "unknown field"),
    ("gpus-not-mapping", "gpus: 3\n", "gpus", "not a mapping"),
    ("entry-not-mapping", "gpus:\n  g: 3\n", "gpus.g", "expected a mapping"),
]


@pytest.mark.parametrize(
    ("text", "key", "reason"), [e[1:] for e in FILE_ERRORS], ids=[e[0] for e in FILE_ERRORS]
)
def test_file_errors(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(CatalogError, match=reason) as info:
        load_gpu_catalog(write(tmp_path, text))
    assert info.value.key == key


def test_missing_file_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_gpu_catalog(tmp_path / "nope.yaml")


def test_new_partial_entry_in_extra_is_an_error_naming_extra(tmp_path: Path) -> None:
    extra = write(tmp_path, "gpus:\n  new-gpu:\n    price_per_hour_usd: 1\n", "extra.yaml")
    with pytest.raises(CatalogError, match=r"extra\.yaml: gpus\.new-gpu\.name: missing field"):
        load_gpu_catalog(extra=extra)
