"""Operations files: alert rules (promtool), Grafana dashboards and provisioning, Kubernetes
manifests and docker-compose. Parsed and cross-checked: required fields, selectors that match
labels, references that resolve, proxy configs that load, the PrometheusRule equal to the
rules file, dashboards equal to what ``grafana/generate.py`` renders.

``python3 tests/unit/test_deploy_manifests.py --write-prometheusrule`` regenerates
``configs/k8s/prometheusrule.yaml`` from ``configs/alerts/rightsizer.rules.yml``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from estimator.report import GAUGE_DOCS
from proxy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "configs" / "alerts"
RULES = ALERTS / "rightsizer.rules.yml"
K8S = ROOT / "configs" / "k8s"
GRAFANA = ROOT / "grafana"
COMPOSE = ROOT / "docker-compose.yaml"
NAMESPACE = "rightsizer"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
SEVERITIES = {"critical", "warning", "info"}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        msg = "promtool is not installed (Debian package 'prometheus'; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def load_rules() -> dict[str, Any]:
    with open(RULES) as f:
        rules: dict[str, Any] = yaml.safe_load(f)
    return rules


def all_rules() -> Iterator[dict[str, Any]]:
    for group in load_rules()["groups"]:
        yield from group["rules"]


# ---- alert rules ------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests() -> None:
    out = subprocess.run([promtool(), "test", "rules", "rightsizer.rules.test.yml"], cwd=ALERTS,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_tested_firing_and_the_tests_hold_silent_series() -> None:
    with open(ALERTS / "rightsizer.rules.test.yml") as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])
             if t.get("exp_alerts")}  # fmt: skip
    alerts = {r["alert"] for r in all_rules() if "alert" in r}
    assert alerts - fired == set(), "alerts without a firing test"
    # every firing test lists exactly which series fire, so the others in its input must not
    silent = 0
    for case in tests:
        fires = {str(e["exp_labels"].get(k)) for t in case.get("alert_rule_test", [])
                 for e in t.get("exp_alerts", []) for k in ("model", "backend", "gpu", "instance",
                                                            "sink")}  # fmt: skip
        series = [s["series"] for s in case["input_series"]]
        silent += sum(not any(f'"{v}"' in s for v in fires) for s in series)
    assert silent >= 10, "too few series that must not fire"


@pytest.mark.parametrize("rule", [r for r in all_rules() if "alert" in r], ids=lambda r: r["alert"])
def test_alert_has_severity_summary_description_with_value_and_runbook(
    rule: dict[str, Any],
) -> None:
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["labels"]["component"]
    ann = rule["annotations"]
    assert ann["summary"] and len(ann["summary"]) < 120
    assert "$value" in ann["description"], "the description must carry the current value"
    assert ann["runbook"].strip()
    assert re.fullmatch(r"Rightsizer[A-Z][A-Za-z]+", rule["alert"])
    assert "for" in rule, "every alert waits before firing"


def test_projected_breach_alert_reads_the_estimator_gauge() -> None:
    exprs = {r["alert"]: r["expr"] for r in all_rules() if "alert" in r}
    assert (
        "rightsizer_estimator_time_to_breach_seconds" in exprs["RightsizerSloBreachProjectedSoon"]
    )
    for name in re.findall(r"rightsizer_estimator_\w+", " ".join(exprs.values())):
        assert name.removeprefix("rightsizer_") in GAUGE_DOCS, name


def _rules_yaml_dump(data: Any) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def str_rep(d: yaml.SafeDumper, s: str) -> yaml.Node:
        return d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)

    Dumper.add_representer(str, str_rep)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=100)


def prometheusrule_text() -> str:
    doc = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "rightsizer", "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "rightsizer-proxy",
                                "app.kubernetes.io/part-of": "rightsizer",
                                "release": "kube-prometheus-stack"}},
        "spec": load_rules(),
    }  # fmt: skip
    head = (
        "# The rules of configs/alerts/rightsizer.rules.yml for the Prometheus operator: generated\n"
        "# (python3 tests/unit/test_deploy_manifests.py --write-prometheusrule); a test keeps\n"
        "# spec.groups identical to that file. Edit the rules there, not here.\n"
    )
    return head + _rules_yaml_dump(doc)


def test_prometheusrule_holds_the_same_rules() -> None:
    (rule,) = [d for d in k8s_docs() if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == load_rules()
    assert (K8S / "prometheusrule.yaml").read_text() == prometheusrule_text(), (
        "regenerate: python3 tests/unit/test_deploy_manifests.py --write-prometheusrule"
    )


# ---- Grafana ----------------------------------------------------------------------------------
def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("grafana_generate", GRAFANA / "generate.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: orjson.loads(p.read_bytes())
        for p in sorted((GRAFANA / "dashboards").glob("*.json"))
    }


def test_dashboards_are_what_the_generator_renders() -> None:
    rendered = _generator().render()
    assert sorted(rendered) == sorted(dashboards())
    for name, text in rendered.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, (
            f"run python3 grafana/generate.py ({name})"
        )


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboard_is_importable(name: str) -> None:
    d = dashboards()[name]
    assert d["uid"].startswith("rightsizer-") and d["title"].startswith("rightsizer: ")
    assert 36 <= d["schemaVersion"] <= 41
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in ("model", "backend", "tenant", "priority"):
        assert variables[var]["type"] == "query" and variables[var]["multi"]
        assert variables[var]["includeAll"] and variables[var]["allValue"] == ".*"
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["expr"].strip()


def test_dashboards_cover_the_issue() -> None:
    text = {n: orjson.dumps(d).decode() for n, d in dashboards().items()}
    for metric in ("rightsizer_requests_total", "rightsizer_time_to_first_token_seconds_bucket",
                   "rightsizer_inter_token_latency_seconds_bucket", "rightsizer_queue_wait_seconds",
                   "rightsizer_request_duration_seconds", "rightsizer_prompt_tokens_total",
                   "rightsizer_completion_tokens_total", "rightsizer_shed_total"):  # fmt: skip
        assert metric in text["traffic.json"], metric
    for g in (
        "capacity_requests_per_second",
        "utilization_ratio",
        "projected_ttft_p95_seconds",
        "projected_itl_p95_seconds",
        "time_to_breach_seconds",
        "recommended_replicas",
        "cost_usd_per_1m_input_tokens",
        "cost_usd_per_hour",
        "fit_relative_error_p90",
    ):
        assert f"rightsizer_estimator_{g}" in text["capacity.json"], g
    for metric in ("rightsizer_engine_running_requests", "rightsizer_engine_waiting_requests",
                   "rightsizer_engine_kv_cache_usage_ratio", "rightsizer_engine_prefix_cache_hits",
                   "rightsizer_gpu_memory_used_bytes", "rightsizer_gpu_utilization_ratio",
                   "rightsizer_gpu_power_watts"):  # fmt: skip
        assert metric in text["backends.json"], metric
    assert sum(d["type"] == "heatmap" for p in dashboards().values() for d in p["panels"]) >= 2


def test_grafana_provisioning() -> None:
    with open(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml") as f:
        ds = yaml.safe_load(f)
    assert ds["datasources"][0]["type"] == "prometheus"
    with open(GRAFANA / "provisioning" / "dashboards" / "rightsizer.yaml") as f:
        prov = yaml.safe_load(f)
    path = prov["providers"][0]["options"]["path"]
    grafana = compose()["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]


# ---- Kubernetes -------------------------------------------------------------------------------
def k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        with open(path) as f:
            docs += [dict(d, _file=path.name) for d in yaml.safe_load_all(f) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_has_the_required_fields() -> None:
    docs = k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule",
            "ScaledObject", "ConfigMap", "StatefulSet", "Namespace"} <= kinds  # fmt: skip
    names = set()
    for d in docs:
        assert d["apiVersion"] and d["kind"], d["_file"]
        meta = d["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
        if d["kind"] != "Namespace":
            assert meta["namespace"] == NAMESPACE, (d["_file"], meta["name"])
        assert meta["labels"]["app.kubernetes.io/part-of"] == "rightsizer"
        assert (d["kind"], meta["name"]) not in names, f"duplicate {d['kind']}/{meta['name']}"
        names.add((d["kind"], meta["name"]))


def _pod(w: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = w["spec"]["template"]
    return pod


@pytest.mark.parametrize("kind", sorted(WORKLOADS - {"DaemonSet"}))
def test_workloads_select_their_own_pods(kind: str) -> None:
    for name, w in by_kind(kind).items():
        sel = w["spec"]["selector"]["matchLabels"]
        assert _matches(sel, _pod(w)["metadata"]["labels"]), name
        spec = _pod(w)["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["readinessProbe"] and c["livenessProbe"]
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports, (name, probe, port)


def test_services_select_pods_and_their_ports_exist() -> None:
    pods = [
        (_pod(w)["metadata"]["labels"], _pod(w)) for k in WORKLOADS for w in by_kind(k).values()
    ]
    for name, svc in by_kind("Service").items():
        matched = [p for labels, p in pods if _matches(svc["spec"]["selector"], labels)]
        assert matched, f"Service {name} selects no pod"
        ports = {
            p["name"] for pod in matched for c in pod["spec"]["containers"] for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)


def test_proxy_deployment() -> None:
    d = by_kind("Deployment")["rightsizer-proxy"]
    assert d["spec"]["replicas"] >= 2
    (c,) = _pod(d)["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    redis_arg = next(a for a in c["args"] if a.startswith("--redis-url="))
    host, port = re.fullmatch(r"--redis-url=redis://([^:/]+):(\d+)/\d+", redis_arg).groups()  # type: ignore[union-attr]
    svc = by_kind("Service")[host.split(".")[0]]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    assert host.split(".")[1] == NAMESPACE
    # the config file comes from the ConfigMap and the admin token from the Secret
    vols = {v["name"]: v for v in _pod(d)["spec"]["volumes"]}
    cm = vols["config"]["configMap"]["name"]
    assert cm in by_kind("ConfigMap")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")["mountPath"]
    assert any(a == f"--config={mount}/proxy.yaml" for a in c["args"])
    secret = next(e for e in c["env"] if e["name"] == "RIGHTSIZER_SERVER__ADMIN_TOKEN")
    assert secret["valueFrom"]["secretKeyRef"]["name"] in by_kind("Secret")
    grace = _pod(d)["spec"]["terminationGracePeriodSeconds"]
    cfg = load_k8s_proxy_config(Path("/nonexistent"))
    assert grace > cfg.server.shutdown_grace_s + 10  # preStop sleep + drain


def test_pdb_selects_the_proxy_and_leaves_room() -> None:
    pdb = by_kind("PodDisruptionBudget")["rightsizer-proxy"]
    d = by_kind("Deployment")["rightsizer-proxy"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], _pod(d)["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < d["spec"]["replicas"]


def test_servicemonitor_scrapes_the_proxy_service() -> None:
    sm = by_kind("ServiceMonitor")["rightsizer-proxy"]
    svc = [s for s in by_kind("Service").values()
           if _matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]  # fmt: skip
    assert [s["metadata"]["name"] for s in svc] == ["rightsizer-proxy"]
    ports = {p["name"] for p in svc[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"


def test_statefulset_has_its_headless_service() -> None:
    for name, sts in by_kind("StatefulSet").items():
        svc = by_kind("Service")[sts["spec"]["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None", name
        assert _matches(svc["spec"]["selector"], _pod(sts)["metadata"]["labels"])


def test_keda_scales_the_backends_on_recommended_replicas() -> None:
    (so,) = by_kind("ScaledObject").values()
    ref = so["spec"]["scaleTargetRef"]
    target = by_kind(ref["kind"])[ref["name"]]
    assert target["kind"] in WORKLOADS
    (trig,) = so["spec"]["triggers"]
    assert trig["type"] == "prometheus" and trig["metadata"]["threshold"] == "1"
    assert trig["metadata"]["query"].startswith("max(rightsizer_estimator_recommended_replicas{")
    assert "estimator_recommended_replicas" in GAUGE_DOCS
    lo, hi = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
    assert 1 <= lo <= hi
    # every replica KEDA may create has a backend entry in the proxy config
    cfg = load_k8s_proxy_config(Path("/nonexistent"))
    urls = {b.url for b in cfg.backends}
    svc, ns = target["spec"]["serviceName"], target["metadata"]["namespace"]
    port = by_kind("Service")[svc]["spec"]["ports"][0]["port"]
    for i in range(hi):
        assert f"http://{ref['name']}-{i}.{svc}.{ns}.svc.cluster.local:{port}" in urls


def load_k8s_proxy_config(tmp: Path) -> Any:
    cm = by_kind("ConfigMap")["rightsizer-proxy-config"]
    return _load_proxy_config(cm["data"]["proxy.yaml"])


def _load_proxy_config(text: str) -> Any:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


def test_k8s_proxy_config_loads_and_matches_the_alert_slo() -> None:
    cfg = load_k8s_proxy_config(Path("/nonexistent"))
    rules = {r.get("record"): r["expr"] for r in all_rules()}
    ttft, itl = cfg.estimator.slo_ttft_p95_s, cfg.estimator.slo_itl_p95_s
    assert (
        rules["rightsizer:slo_ttft_p95_seconds"]
        == f"max(rightsizer_slo_ttft_p95_seconds) or vector({ttft})"
    )
    assert (
        rules["rightsizer:slo_itl_p95_seconds"]
        == f"max(rightsizer_slo_itl_p95_seconds) or vector({itl})"
    )
    assert cfg.server.host == "0.0.0.0"


# ---- docker-compose ---------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    with open(COMPOSE) as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def test_compose_stack() -> None:
    c = compose()
    s = c["services"]
    proxies = [n for n, svc in s.items() if svc.get("command", [None])[0] == "serve"]
    assert len(proxies) == 2
    for n in proxies:
        assert "--redis-url=redis://redis:6379/0" in s[n]["command"], n
        assert s[n]["depends_on"]["redis"]["condition"] == "service_healthy"
    cfg = _load_proxy_config(c["configs"]["proxy_config"]["content"])
    engines = {b.url.removeprefix("http://").split(":")[0] for b in cfg.backends}
    assert engines <= set(s), engines
    assert cfg.server.host == "0.0.0.0"
    prom = s["prometheus"]
    assert "./configs/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "./configs/alerts:/etc/prometheus/rules:ro" in prom["volumes"]
    with open(ROOT / "configs" / "prometheus.yml") as f:
        pcfg = yaml.safe_load(f)
    assert pcfg["rule_files"] == [f"/etc/prometheus/rules/{RULES.name}"]
    targets = pcfg["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{n}:8080" for n in proxies)
    # the emulated engines' model config is in the image (the Dockerfile copies configs/)
    for n in engines:
        model = next(a for a in s[n]["command"] if a.startswith("--model="))
        assert (
            ROOT / "configs" / Path(model.split("=", 1)[1]).relative_to("/etc/rightsizer")
        ).exists()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        (K8S / "prometheusrule.yaml").write_text(prometheusrule_text())
        print(f"wrote {K8S / 'prometheusrule.yaml'}")
    else:
        sys.exit(__doc__)
