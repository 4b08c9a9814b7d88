"""``rightsizer estimate``: tables, JSON, plots, replay of a log, argument errors."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from estimator.cli import (
    EXIT_PLOT_UNAVAILABLE,
    add_estimate_arguments,
    estimate_inputs,
    print_estimate,
    run_estimate,
)
from estimator.engine import roofline_prior
from estimator.engines import get_profile, profile_names
from estimator.projection import project
from estimator.records import RequestRecord

CONFIG = str(Path(__file__).parent / "configs" / "llama-3.1-8b.json")
FAST = [
    "--alternatives",
    "l4,a100-80gb,h100-sxm",
    "--max-simulated",
    "4",
    "--max-model-len",
    "8192",
]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rightsizer estimate")
    add_estimate_arguments(p)
    return p.parse_args(argv)


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return run_estimate(parse(argv), out=out), out.getvalue()


BASE = ["--model", CONFIG, "--gpu", "a100-80gb", "--slo", "ttft_p95=1.0,itl_p95=0.05"]


def test_table_and_png(tmp_path: Path) -> None:
    png = tmp_path / "out.png"
    code, text = run([*BASE, "--traffic", "rate=3,prompt=lognormal:512:0.6,output=128",
                      "--plot", str(png), *FAST])  # fmt: skip
    assert code == 0
    for needle in ("capacity at SLO", "KV capacity", "alternatives", "a100-80gb", "$/hour"):
        assert needle in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_and_self_contained_html(tmp_path: Path) -> None:
    page = tmp_path / "out.html"
    code, text = run([*BASE, "--traffic", "rate=2,prompt=512,output=128", "--json",
                      "--plot", str(page), *FAST])  # fmt: skip
    assert code == 0
    d = json.loads(text)
    assert d["memory"]["fits"] and d["capacity_rps_per_replica"] > 0
    assert d["cost"]["usd_per_hour"] > 0 and d["alternatives"]
    assert {r["kind"] for r in d["recommendations"]} >= {"replicas", "max_model_len"}
    html = page.read_text()
    assert "<svg" in html and "<script" not in html and "src=" not in html


def test_traffic_log(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    with log.open("w") as f:
        for i in range(300):
            r = RequestRecord(request_id=str(i), model="m", arrival_epoch=1e9 + i * 0.5,
                              prompt_tokens=400 + i % 50, completion_tokens=100)  # fmt: skip
            f.write(json.dumps(r.to_dict()) + "\n")
    code, text = run([*BASE, "--traffic-log", str(log), "--json", *FAST])
    assert code == 0
    d = json.loads(text)
    assert d["traffic"]["rate_rps"] == pytest.approx(2.0, rel=0.01)
    assert "empirical" in d["traffic"]["description"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--gpu", "nope", "--traffic", "rate=1"], "--gpu"),
        (["--gpu", "l4", "--traffic", "rate=1", "--quant", "int3"], "--quant"),
        (["--gpu", "l4", "--traffic", "rate=1", "--plot", "x.jpg"], "--plot"),
        (["--gpu", "l4", "--traffic-log", "/nonexistent.jsonl"], "--traffic-log"),
        (["--gpu", "l4", "--traffic", "rate=1", "--alternatives", "zz"], "--alternatives"),
    ],
    ids=["gpu", "quant", "plot", "log", "alternatives"],
)
def test_bad_values_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run(["--model", CONFIG, *argv])
    assert code == 2
    assert flag in capsys.readouterr().err


def test_bad_model_path(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["--model", "/nonexistent/config.json", "--gpu", "l4", "--traffic", "rate=1"])
    assert code == 2 and "--model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--traffic", "rate=x"], "--traffic"),
        (["--traffic", "rate=1,prompt=gauss:1"], "--traffic"),
        (["--traffic", "rate=1", "--slo", "ttft=1"], "--slo"),
        (["--traffic", "rate=1", "--gpus-per-replica", "0"], "--gpus-per-replica"),
        (["--traffic", "rate=1", "--traffic-log", "x.jsonl"], "--traffic-log"),
    ],
    ids=["rate", "dist", "slo", "tp", "both-sources"],
)
def test_parse_errors_exit_2(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--model", CONFIG, "--gpu", "l4", *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_without_traffic_the_default_is_used_and_said() -> None:
    code, text = run(["--model", CONFIG, "--gpu", "a100-80gb", *FAST])
    assert code == 0
    assert "the default: give --traffic for yours" in text and "1 req/s, prompt 512" in text


def test_model_by_packaged_name_and_by_hugging_face_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "1"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(Path(CONFIG).read_text())
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for model in ("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", str(snap)):
        code, text = run(["--model", model, "--gpu", "a100-80gb", "--json", *FAST])
        assert code == 0, model
        assert json.loads(text)["memory"]["params"] > 7e9


def test_unknown_model_names_what_was_tried(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run(["--model", "llama-9", "--gpu", "l4"])
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "llama-3.1-8b" in err and "qwen2.5-7b" in err


def test_the_first_things_a_memory_planner_shows() -> None:
    code, text = run([*BASE, "--traffic", "rate=2,prompt=512,output=128", *FAST])
    assert code == 0
    for needle in ("8.03 B parameters", "KV cache 128 KiB per token", "memory per GPU",
                   "weights 15.0", "KV capacity", "TTFT p95 <= 1000 ms"):  # fmt: skip
        assert needle in text, needle


def test_the_configuration_shown_is_the_one_the_alternatives_call_now() -> None:
    code, text = run([*BASE, "--traffic", "rate=5,prompt=lognormal:1024:0.8,output=256",
                      "--json", *FAST])  # fmt: skip
    assert code == 0
    d = json.loads(text)
    now = next(a for a in d["alternatives"] if a["current"])
    assert d["meets_slo_at_rate"] is True and d["utilization"] < 1.0
    assert now["replicas"] == d["replicas"] == d["recommended_replicas"]
    assert now["capacity_rps_per_replica"] == d["capacity_rps_per_replica"]
    assert d["slo"]["ttft_p95_s"] == 1.0 and "every gap" in d["slo"]["definition"]


def test_dead_options_show_their_verdict_without_prices() -> None:
    big = str(Path(CONFIG).parent / "llama-2-70b.json")
    code, text = run(["--model", big, "--gpu", "l4", "--alternatives", "l4,h100-sxm",
                      "--max-simulated", "3", "--max-model-len", "4096"])  # fmt: skip
    assert code == 0 and "does not fit" in text
    for line in text.splitlines():
        if "does not fit" in line and "x1xl4" in line.replace(" ", ""):
            assert "$" not in line and "0.00" not in line


def test_plot_without_matplotlib_prints_the_table_then_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    code, text = run([*BASE, "--traffic", "rate=2", "--plot", str(tmp_path / "p.png"), *FAST])
    assert code == EXIT_PLOT_UNAVAILABLE == 3
    assert "capacity at SLO" in text and "pip install 'rightsizer[plot]'" in text
    assert not (tmp_path / "p.png").exists()


# ---- engines, benchmark loads, "which runtime?" ------------------------------------------------
H100 = ["--model", CONFIG, "--gpu", "h100-sxm", "--traffic", "rate=2,prompt=512,output=128",
        "--alternatives", "h100-sxm", "--max-simulated", "2", "--max-model-len", "8192"]  # fmt: skip


def plain(argv: list[str]) -> tuple[dict[str, object], str]:
    """The report as JSON and as the plain-text tables (no rich: nothing wraps)."""
    args = parse(argv)
    inputs = estimate_inputs(args)
    report = project(inputs).report
    buf = io.StringIO()
    print_estimate(report, inputs.config, buf, rich_ok=False)
    return report.to_dict(), buf.getvalue()


@pytest.mark.parametrize(("flags", "kind", "title"),
                         [(["--engine", "sglang", "--concurrency", "32"], "concurrency",
                           "benchmark: concurrency 32 on one replica of SGLang on 1x h100-sxm bf16"),
                          (["--burst", "500"], "burst",
                           "benchmark: burst 500 on one replica of vLLM (V1 engine) on 1x h100-sxm"),
                          ([], "poisson", "benchmark: Poisson 1 req/s on one replica")],
                         ids=["concurrency", "burst", "offered-rate"])  # fmt: skip
def test_a_benchmark_load_prints_percentiles_with_bands(flags: list[str], kind: str,
                                                        title: str) -> None:  # fmt: skip
    d, text = plain([*H100, *flags])
    assert title in text
    load = d["load"]
    assert isinstance(load, dict) and load["kind"] == kind
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    assert lines[head].split() == ["metric", "mean", "p50", "p90", "p95", "p99", "band", "of",
                                   "the", "mean"]  # fmt: skip
    rows = {line.split("  ")[0]: line for line in lines[head + 1 : head + 6]}
    assert list(rows) == ["TTFT (ms)", "ITL (ms)", "TPOT (ms)", "e2e (ms)", "output tok/s"]
    for name, metric in (("TTFT (ms)", "ttft"), ("ITL (ms)", "itl"), ("e2e (ms)", "e2e")):
        lo, hi = load["bands"][metric]
        mean = load[metric]["mean"]
        assert lo < mean < hi
        assert rows[name].split()[-1] == f"{_ms(lo)}-{_ms(hi)}"
    lo, hi = load["bands"]["throughput"]
    assert rows["output tok/s"].split()[-1] == f"{lo:.0f}-{hi:.0f}"
    assert "10th-90th percentile of published / predicted" in text and "~80%" in text


def _ms(x: float) -> str:
    ms = x * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def test_the_rich_tables_show_the_load_too() -> None:
    code, text = run([*H100, "--engine", "sglang", "--concurrency", "32"])
    assert code == 0
    for needle in ("benchmark: concurrency 32", "TTFT (ms)", "TPOT (ms)", "output tok/s",
                   "band of the mean", "which runtime?"):  # fmt: skip
        assert needle in text, needle


def test_the_runtime_comparison_lists_every_profile_with_its_caveat() -> None:
    d, text = plain([*H100, "--engine", "trtllm", "--concurrency", "16"])
    engines = d["engines"]
    assert isinstance(engines, list)
    assert sorted(e["engine"] for e in engines) == sorted(profile_names())
    assert [e["rank"] for e in engines] == list(range(1, len(engines) + 1))
    assert [e["engine"] for e in engines if e["current"]] == ["trtllm"]
    table = text[text.index("which runtime?") :]
    for name in profile_names():
        p = get_profile(name)
        assert p.title in table and f"  {p.title}: {p.validation}" in table, name
    assert "TensorRT-LLM (this estimate)" in table


def test_an_unknown_engine_names_the_flag_and_the_known_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--model", CONFIG, "--gpu", "l4", "--engine", "bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--engine" in err and "bogus" in err and "vllm, sglang, trtllm, tgi, llamacpp" in err
    assert parse(["--model", CONFIG, "--gpu", "l4", "--engine", "TensorRT-LLM"]).engine == "trtllm"


def test_concurrency_and_burst_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--model", CONFIG, "--gpu", "l4", "--concurrency", "8", "--burst", "8"])
    assert e.value.code == 2 and "--burst" in capsys.readouterr().err


# engine -> max_num_seqs and block size of its memory plan on an H100 when no flag sets them
ENGINE_DEFAULTS = {"vllm": (1024, 16), "sglang": (4096, 1), "trtllm": (2048, 32)}


@pytest.mark.parametrize("engine", list(ENGINE_DEFAULTS))
def test_engine_settings_default_to_the_engines_own(engine: str) -> None:
    d, _ = plain([*H100, "--engine", engine])
    memory = d["memory"]
    assert isinstance(memory, dict) and d["engine"] == engine
    seqs, block = ENGINE_DEFAULTS[engine]
    assert memory["max_num_seqs"] == seqs
    assert memory["kv_capacity_tokens"] == memory["num_blocks"] * block


def test_engine_flags_reach_the_plan_and_the_prior() -> None:
    args = parse([*H100, "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
                  "--enforce-eager", "--gpu-memory-utilization", "0.8"])  # fmt: skip
    inputs = estimate_inputs(args)
    cfg = inputs.config
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enforce_eager) == (64, 4096, True)
    assert inputs.prior is not None and inputs.arch is not None and inputs.gpu is not None
    assert inputs.prior == roofline_prior(inputs.arch, inputs.gpu, enforce_eager=True)
    d = project(inputs).report
    assert d.memory is not None and d.memory.max_num_seqs == 64
    assert d.memory.cuda_graph_bytes_per_gpu == 0
    assert d.memory.budget_bytes_per_gpu == pytest.approx(0.8 * d.memory.memory_bytes_per_gpu,
                                                          rel=1e-6)  # fmt: skip
