"""The estimator's one configuration: ``EstimatorConfig``.

Every entry point reads it: the proxy (embedded as the ``estimator:`` section of its YAML, see
``proxy/config.py``), ``rightsizer estimator`` (the estimator as its own process),
``rightsizer estimate`` (its flags fill the same fields) and ``rightsizer demo``. Defaults live
only here, in the field defaults, and each field documents itself in
``field(metadata={"doc": ...})``: the README's configuration reference is generated from it.

The SLO is one definition everywhere: p95 time to first token (arrival at the proxy to the
first content-bearing chunk) and p95 inter-token latency over **all gaps between tokens**
(pooled across requests, not a percentile of per-request summaries).

``validate(config, catalog)`` checks what needs the GPU catalog or the engine profiles and
canonicalises aliases (``int4-awq`` -> ``int4``, ``tensorrt-llm`` -> ``trtllm``); its
``EstimatorConfigError`` carries the key (``estimator.gpu``) and the reason separately, so the
proxy turns it into its own config error without parsing a message. The class is frozen,
slotted and picklable: the refresh can run in a child process built from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from estimator.capacity import Slo
from estimator.catalog import GpuSpec, get_quantization
from estimator.engines import UnknownEngine, get_profile

KV_DTYPES: tuple[str, ...] = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16")
QUANT_ALIASES: Mapping[str, str] = {
    "int4-awq": "int4", "int4-gptq": "int4", "awq": "int4", "gptq": "int4",
}  # fmt: skip


def _doc(text: str, default: Any = None, *, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


class EstimatorConfigError(ValueError):
    """A bad estimator setting: ``key`` (``estimator.gpu``) and ``reason`` kept apart."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimatorConfig:
    """Settings of the estimator. Durations in seconds, rates in requests/s."""

    enabled: bool = _doc("Run the online estimator (inside the proxy: `rightsizer serve`).", True)
    refresh_interval_s: float = _doc("How often the estimator refits and re-projects.", 15.0)
    slo_ttft_p95_s: float = _doc(
        "SLO: p95 time to first token (arrival at the proxy to the first content chunk).", 0.5
    )
    slo_itl_p95_s: float = _doc(
        "SLO: p95 inter-token latency over all gaps between tokens (pooled over requests).", 0.05
    )
    gpu: str | None = _doc(
        "GPU catalog key the backends run on (cost, roofline prior), e.g. h100-sxm; "
        "None: unknown.", None,
    )  # fmt: skip
    backend_gpus: Mapping[str, str] = _doc(
        "Backend name -> GPU catalog key, overriding `gpu` for that backend.", factory=dict
    )
    gpus_per_backend: int = _doc("GPUs behind each backend (tensor-parallel degree).", 1)
    quant: str = _doc(
        "Weight format the backends run: bf16, fp8, int8, int4 (int4-awq, int4-gptq).", "bf16"
    )
    kv_dtype: str = _doc("KV-cache dtype the backends run: auto or fp8.", "auto")
    model_configs: Mapping[str, str] = _doc(
        "Served model name -> its Hugging Face config.json (a path, a folder holding one, or a "
        "packaged name such as llama-3.1-8b); enables the roofline prior and memory plans.",
        factory=dict,
    )
    catalog: str | None = _doc("Extra GPU catalog YAML merged over the packaged one.", None)
    engine: str = _doc(
        "Serving engine the backends run: vllm, sglang, trtllm, tgi or llamacpp (its profile "
        "sets the roofline prior's efficiencies, the memory plan and the default limits; "
        "estimator/engines/).", "vllm",
    )  # fmt: skip
    gpu_memory_utilization: float | None = _doc(
        "The engine's memory fraction, for memory plans (vLLM gpu_memory_utilization, SGLang "
        "mem_fraction_static, TensorRT-LLM kv_cache_free_gpu_mem_fraction); None: the "
        "engine's default.", None,
    )  # fmt: skip
    max_num_seqs: int | None = _doc(
        "Engine max_num_seqs assumed when the engine does not expose it; None: the engine's "
        "default for the GPU (vLLM: 256, 1024 on 70+ GiB GPUs but the A100, 128 on its CPU "
        "build).", None,
    )  # fmt: skip
    max_num_batched_tokens: int | None = _doc(
        "Engine max_num_batched_tokens (tokens per step); None: the engine's default for the "
        "GPU (vLLM: 2048; 8192 on 70+ GiB GPUs but the A100, 16384 on 160+ GiB).", None,
    )  # fmt: skip
    enforce_eager: bool = _doc(
        "The engine runs without CUDA graphs (vLLM --enforce-eager): a longer step in the "
        "prior, no graph memory in the plan.", False,
    )  # fmt: skip
    max_model_len: int | None = _doc(
        "Engine max_model_len assumed when not exposed; None: the model's maximum.", None
    )
    min_records: int = _doc("Requests a model needs before it is projected.", 50)
    trend_window_s: float = _doc("Window the arrival-rate trend is fitted on.", 3600.0)
    latency_window_s: float = _doc("Window of the observed TTFT/ITL p95.", 300.0)
    forecast_horizon_s: float = _doc("Horizon of the forecast peak that sizes replicas.", 3600.0)
    breach_horizon_s: float = _doc("How far ahead the time to SLO breach is searched.", 604800.0)
    spare_replicas: int = _doc("Spare replicas on top of those the forecast peak needs (N+1).", 1)
    max_actionable_band: float = _doc(
        "Relative uncertainty of capacity (e.g. 0.5: +-50%) above which replica counts are "
        "not recommended (the report says why and gives the range instead).", 0.5,
    )  # fmt: skip
    advisor_gpus: tuple[str, ...] = _doc(
        "GPU keys the alternatives search considers; empty: the whole catalog but CPUs.", ()
    )
    advisor_max_simulated: int = _doc(
        "Alternatives simulated per search at most (the cheapest by a first estimate).", 8
    )
    sim_requests: int = _doc("Requests per simulated capacity probe.", 800)
    records_per_model: int = _doc("Records kept per model for length distributions.", 1 << 17)
    pending_records: int = _doc(
        "Records buffered between refreshes; beyond it the oldest are dropped and counted.", 1 << 18
    )
    max_models: int = _doc("Models tracked at most; records of further models are dropped.", 64)
    max_backends: int = _doc("Backends tracked at most.", 256)
    active_window_s: float = _doc(
        "A backend counts as a replica of a model while it served one of its requests within "
        "this window, or while its last scrape says it is up and lists the model.", 600.0,
    )  # fmt: skip

    @property
    def slo(self) -> Slo:
        return Slo(ttft_p95_s=self.slo_ttft_p95_s, itl_p95_s=self.slo_itl_p95_s)

    def gpu_for(self, backend: str | None) -> str | None:
        if backend is not None and backend in self.backend_gpus:
            return self.backend_gpus[backend]
        return self.gpu


def describe_slo(slo: Slo) -> str:
    """The SLO in words, as every table and report prints it."""
    q = f"p{slo.quantile * 100:g}"
    return (f"TTFT {q} <= {slo.ttft_p95_s * 1e3:g} ms, ITL {q} <= {slo.itl_p95_s * 1e3:g} ms "
            "(over all token gaps)")  # fmt: skip


def validate(config: EstimatorConfig, catalog: Mapping[str, GpuSpec]) -> EstimatorConfig:
    """``config`` with canonical names (``int4-awq`` -> ``int4``), or ``EstimatorConfigError``
    naming the key (``estimator.gpu``, ``estimator.backend_gpus.b1``, ``estimator.quant``...)."""
    keys = [("estimator.gpu", config.gpu)]
    keys += [(f"estimator.backend_gpus.{b}", g) for b, g in config.backend_gpus.items()]
    for where, key in keys:
        if key is not None and key not in catalog:
            raise EstimatorConfigError(
                where, f"unknown GPU {key!r}; known: {', '.join(sorted(catalog))}"
            )
    for where, gpu in (("estimator.advisor_gpus", g) for g in config.advisor_gpus):
        if gpu not in catalog:
            raise EstimatorConfigError(
                where, f"unknown GPU {gpu!r}; known: {', '.join(sorted(catalog))}"
            )
    quant = QUANT_ALIASES.get(config.quant.lower(), config.quant.lower())
    try:
        get_quantization(quant)
    except ValueError as e:
        raise EstimatorConfigError("estimator.quant", str(e)) from None
    if config.kv_dtype not in KV_DTYPES:
        raise EstimatorConfigError(
            "estimator.kv_dtype", f"unknown {config.kv_dtype!r}; use auto or fp8"
        )
    try:
        engine = get_profile(config.engine).name
    except UnknownEngine as e:
        raise EstimatorConfigError("estimator.engine", str(e)) from None
    for key in ("gpus_per_backend", "sim_requests", "advisor_max_simulated", "max_num_seqs",
                "max_num_batched_tokens"):  # fmt: skip
        value = getattr(config, key)
        if value is not None and value < 1:
            raise EstimatorConfigError(f"estimator.{key}", "must be >= 1")
    for key in ("slo_ttft_p95_s", "slo_itl_p95_s", "refresh_interval_s"):
        if not getattr(config, key) > 0:
            raise EstimatorConfigError(f"estimator.{key}", "must be > 0")
    util = config.gpu_memory_utilization
    if util is not None and not 0.0 < util <= 1.0:
        raise EstimatorConfigError("estimator.gpu_memory_utilization", "must be in (0, 1]")
    return replace(config, quant=quant, engine=engine)


# ---- model configs ----------------------------------------------------------------------------
class ModelConfigNotFound(ValueError):
    """A ``--model`` / ``model_configs`` value that names no config.json; says what was tried."""


def packaged_models() -> dict[str, Path]:
    """Model configs shipped with the package (``estimator/data/models/NAME.json``)."""
    folder = Path(str(resources.files("estimator").joinpath("data", "models")))
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def hf_hub_dir() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "huggingface")  # fmt: skip
    return Path(home) / "hub"


def resolve_model_config(spec: str | Path) -> Path:
    """The config.json ``spec`` names, tried in this order: an existing file, a folder holding
    config.json, a packaged name (``llama-3.1-8b``), a Hugging Face id (``org/name``) already in
    the local hub cache (its newest snapshot). Nothing is downloaded. ``ModelConfigNotFound``
    names everything tried."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise ModelConfigNotFound(f"{spec}: the folder holds no config.json")
    packaged = packaged_models()
    text = str(spec)
    if text in packaged:
        return packaged[text]
    tried = [f"no file or folder {text!r}",
             f"no packaged model {text!r} (packaged: {', '.join(packaged) or 'none'})"]  # fmt: skip
    if text.count("/") == 1 and not text.startswith(("/", ".")):
        repo = hf_hub_dir() / ("models--" + text.replace("/", "--"))
        found = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        tried.append(f"not in the Hugging Face cache ({repo}; nothing is downloaded: "
                     f"`huggingface-cli download {text} config.json` fetches it)")  # fmt: skip
    raise ModelConfigNotFound("; ".join(tried))
