"""The one estimator configuration: defaults, YAML, validation that names the key, model
config resolution (path, folder, packaged name, Hugging Face cache), pickling."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from estimator.catalog import load_gpu_catalog
from estimator.cli import add_estimate_arguments
from estimator.service import EstimatorConfig as ReExported
from estimator.settings import (
    EstimatorConfig,
    EstimatorConfigError,
    ModelConfigNotFound,
    packaged_models,
    resolve_model_config,
    validate,
)
from proxy.config import ConfigError, load_config, reference_markdown
from proxy.programs.demo import demo_config
from proxy.programs.wiring import build_estimator

CATALOG = load_gpu_catalog()


def test_one_class_one_default_in_every_entry_point() -> None:
    assert ReExported is EstimatorConfig
    default = EstimatorConfig()
    assert (default.slo_ttft_p95_s, default.slo_itl_p95_s) == (0.5, 0.05)
    assert load_config(environ={}).estimator == default  # serve, estimator
    p = argparse.ArgumentParser()
    add_estimate_arguments(p)
    slo = p.parse_args(["--model", "m", "--gpu", "l4"]).slo  # estimate
    assert (slo.ttft_p95_s, slo.itl_p95_s) == (0.5, 0.05)
    demo = demo_config()  # demo: the defaults but for what the emulated engines are
    assert (demo.slo_ttft_p95_s, demo.slo_itl_p95_s) == (0.5, 0.05)


def test_every_field_is_documented_and_in_the_reference() -> None:
    reference = "\n".join(reference_markdown())
    for f in dataclasses.fields(EstimatorConfig):
        assert f.metadata.get("doc"), f.name
        assert f"`estimator.{f.name}`" in reference, f.name


def test_every_knob_can_be_set_from_yaml(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "estimator:\n  kv_dtype: fp8\n  advisor_gpus: [l4, h100-sxm]\n"
        "  backend_gpus: {b1: a10g}\n  sim_requests: 400\n  spare_replicas: 2\n"
        "  max_actionable_band: 0.3\n  engine: sglang\n  max_num_batched_tokens: 4096\n"
        "  enforce_eager: true\n"
    )
    e = load_config(f, environ={}).estimator
    assert (e.engine, e.max_num_batched_tokens, e.enforce_eager) == ("sglang", 4096, True)
    assert e.kv_dtype == "fp8" and e.advisor_gpus == ("l4", "h100-sxm")
    assert dict(e.backend_gpus) == {"b1": "a10g"} and e.sim_requests == 400
    assert e.spare_replicas == 2 and e.max_actionable_band == 0.3


@pytest.mark.parametrize(
    ("section", "key", "reason"),
    [({"gpu": "h100"}, "estimator.gpu", "unknown GPU 'h100'; known: "),
     ({"backend_gpus": {"b1": "x"}}, "estimator.backend_gpus.b1", "unknown GPU 'x'"),
     ({"advisor_gpus": ["l4", "zz"]}, "estimator.advisor_gpus", "unknown GPU 'zz'"),
     ({"quant": "int3"}, "estimator.quant", "int3"),
     ({"kv_dtype": "int2"}, "estimator.kv_dtype", "use auto or fp8"),
     ({"gpus_per_backend": 0}, "estimator.gpus_per_backend", "must be >= 1"),
     ({"gpu_memory_utilization": 1.5}, "estimator.gpu_memory_utilization", "(0, 1]"),
     ({"engine": "vlm"}, "estimator.engine",
      "unknown engine 'vlm'; known: vllm, sglang, trtllm, tgi, llamacpp"),
     ({"max_num_batched_tokens": 0}, "estimator.max_num_batched_tokens", "must be >= 1")],
    ids=["gpu", "backend-gpu", "advisor-gpu", "quant", "kv-dtype", "tp", "gpu-mem", "engine",
         "batched-tokens"],
)  # fmt: skip
def test_errors_name_the_key(section: dict[str, object], key: str, reason: str) -> None:
    config = load_config(environ={}, overrides={"estimator": section})
    with pytest.raises(ConfigError) as info:
        build_estimator(config, "p.yaml")
    assert info.value.key == key and reason in info.value.reason
    assert str(info.value).startswith(f"p.yaml: {key}: ")


def test_validate_canonicalises_aliases_and_keeps_the_rest() -> None:
    cfg = validate(EstimatorConfig(quant="int4-awq", gpu="l4", engine="TensorRT-LLM"), CATALOG)
    assert cfg.quant == "int4" and cfg.gpu == "l4" and cfg.engine == "trtllm"
    with pytest.raises(EstimatorConfigError) as info:
        validate(EstimatorConfig(slo_itl_p95_s=0.0), CATALOG)
    assert info.value.key == "estimator.slo_itl_p95_s"


def test_config_pickles_for_a_child_process() -> None:
    cfg = EstimatorConfig(gpu="a10g", model_configs={"m": "llama-3.1-8b"},
                          backend_gpus={"b": "l4"}, advisor_gpus=("l4",))  # fmt: skip
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ---- model configs ------------------------------------------------------------------------------
def _config_json(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder / "config.json"


def _hf_snapshot(home: Path, repo: str) -> Path:
    base = home / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / "abc123"
    return _config_json(base)


@pytest.mark.parametrize("kind", ["file", "folder", "packaged", "hf-cache"])
def test_model_config_resolution(kind: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if kind == "file":
        want = _config_json(tmp_path / "m")
        spec = str(want)
    elif kind == "folder":
        want = _config_json(tmp_path / "m")
        spec = str(tmp_path / "m")
    elif kind == "packaged":
        want, spec = packaged_models()["llama-3.1-8b"], "llama-3.1-8b"
    else:
        want, spec = _hf_snapshot(tmp_path / "hf", "org/some-model"), "org/some-model"
    assert resolve_model_config(spec) == want


@pytest.mark.parametrize(
    ("spec", "needles"),
    [("org/absent", ["no packaged model", "llama-3.1-8b", "not in the Hugging Face cache",
                     "models--org--absent", "nothing is downloaded"]),
     ("no-such-name", ["no file or folder", "no packaged model", "qwen2.5-7b"])],
    ids=["hf-id", "name"],
)  # fmt: skip
def test_unresolved_model_config_says_what_was_tried(
    spec: str, needles: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelConfigNotFound) as info:
        resolve_model_config(spec)
    for needle in needles:
        assert needle in str(info.value)


def test_a_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigNotFound, match=r"holds no config\.json"):
        resolve_model_config(tmp_path)
