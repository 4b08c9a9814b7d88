"""``rightsizer estimate``: tables, JSON, plots, replay of a log, argument errors."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from estimator.cli import add_estimate_arguments, run_estimate
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
    assert d["rate_rps"] == pytest.approx(2.0, rel=0.01)
    assert "empirical" in d["traffic"]


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
        ([], "--traffic"),
    ],
    ids=["rate", "dist", "slo", "tp", "missing"],
)
def test_parse_errors_exit_2(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--model", CONFIG, "--gpu", "l4", *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
