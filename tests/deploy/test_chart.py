"""The Helm chart: it lints, renders for the default and the GPU values (and
the other shapes an operator picks), every manifest validates against the
Kubernetes schemas, the schema refuses typos, and every container's command
line is one the `myriad` binary accepts.

Rendering uses Helm's own engine (the `helm-python-sdk` package binds it), so
no `helm` binary and no cluster are needed.
"""

import copy
import json
import pathlib
import re
import subprocess

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "myriad"
BINARY = ROOT / "target" / "debug" / "myriad"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the
# newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]

GPU = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
EVERYTHING = {
    "etcd": {"endpoints": ["http://etcd-a.infra:2379", "http://etcd-b.infra:2379"]},
    "model": {"source": "pvc", "claimName": "models", "path": "/models/tiny-v4"},
    "coordinator": {"adminToken": {"value": "s3cret"}, "config": {"redundant": 4, "maxMove": "20GiB"}},
    "router": {
        "config": {"servedModelName": "deepseek-v4", "maxModelLen": 131072},
        "apiKeys": {"values": ["key-a", "key-b"]},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "hosts": [{"host": "myriad.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "myriad-tls", "hosts": ["myriad.example.com"]}],
        },
        "autoscaling": {"enabled": True},
        "service": {"type": "LoadBalancer"},
    },
    "kvcache": {"persistence": {"enabled": False}},
    "otel": {"endpoint": "http://otel-collector:4317"},
    "serviceMonitor": {"create": "always"},
}
SECURED = {
    "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "myriad-ca", "kind": "ClusterIssuer"}}},
    "etcd": {
        "endpoints": ["https://etcd-a.infra:2379"],
        "tls": {"secret": "etcd-client"},
        "auth": {"user": "myriad", "passwordSecret": {"name": "etcd-login"}},
    },
}
DOWNLOADED = {
    "model": {
        "source": "pvc",
        "claimName": "models",
        "path": "/models/DeepSeek-V4-Flash",
        "download": {"enabled": True, "repository": "deepseek-ai/DeepSeek-V4-Flash", "secret": "hf"},
    }
}
VALUE_SETS = {
    "default": {},
    "downloaded": DOWNLOADED,
    "secured": SECURED,
    "gpu": GPU,
    "everything": EVERYTHING,
    "no-kvcache-host-model": {
        "kvcache": {"enabled": False},
        "model": {"source": "hostPath", "hostPath": "/srv/models", "path": "/models/tiny-v4"},
    },
}


NOTES = "myriad/templates/NOTES.txt"


def rendered(values=None, release="prod"):
    """Each template's output for `values`, by path, as Helm installs `release` in `ml`."""
    chart = helm.Chart.load(str(CHART))
    return chart.render(copy.deepcopy(values) if values else None, name=release, namespace="ml", is_install=True)


def render(values=None, release="prod"):
    """The chart's manifests for `values`, as parsed documents."""
    docs = []
    for path, text in sorted(rendered(values, release).items()):
        if path != NOTES:
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def notes(values=None):
    return rendered(values)[NOTES]


def find(docs, kind, name):
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found among {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return matches[0]


def container(docs, kind, name):
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def env(c):
    return {e["name"]: e for e in c.get("env", [])}


def test_the_chart_lints_without_warnings():
    for values in VALUE_SETS.values():
        report = helm.lint(str(CHART), copy.deepcopy(values), strict=True, namespace="ml")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


def for_version(doc, version):
    """`doc` as the chart renders it for Kubernetes `version`: fields gated on
    `.Capabilities.KubeVersion` go below the version that introduced them
    (the renderer here reports a recent one)."""
    if doc["kind"] == "PodDisruptionBudget" and tuple(map(int, version.split(".")[:2])) < (1, 27):
        doc = copy.deepcopy(doc)
        doc["spec"].pop("unhealthyPodEvictionPolicy", None)
    return doc


def test_fields_of_newer_kubernetes_are_gated_on_its_version():
    worker = (CHART / "templates" / "worker.yaml").read_text()
    assert 'semverCompare ">=1.27-0" .Capabilities.KubeVersion.Version' in worker


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_manifest_validates_against_the_kubernetes_schemas(name):
    docs = render(VALUE_SETS[name])
    assert len(docs) >= 10
    for doc in docs:
        if doc["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate", "ScaledObject"):
            # A CRD: not in the Kubernetes schemas; checked in its own test.
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(for_version(doc, version), version, strict=True)


def test_the_default_install_has_every_role():
    docs = render()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for kind, name in [
        ("Deployment", "prod-myriad-coordinator"),
        ("StatefulSet", "prod-myriad-worker"),
        ("Deployment", "prod-myriad-router"),
        ("Service", "prod-myriad-router"),
        ("StatefulSet", "prod-myriad-kvcache"),
        ("StatefulSet", "prod-myriad-etcd"),
        ("Service", "prod-myriad-etcd"),
        ("PodDisruptionBudget", "prod-myriad-worker"),
        ("PodDisruptionBudget", "prod-myriad-coordinator"),
        ("NetworkPolicy", "prod-myriad-worker"),
    ]:
        assert (kind, name) in kinds
    assert find(docs, "Deployment", "prod-myriad-coordinator")["spec"]["replicas"] == 2
    assert not [d for d in docs if d["kind"] in ("Ingress", "HorizontalPodAutoscaler", "Secret", "ServiceMonitor")]


def expand(arg, variables):
    """Kubernetes' $(VAR) expansion in container args."""
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables[m.group(1)], arg)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_container_command_line_is_accepted_by_the_binary(name):
    """The values mirror the flags: each role's rendered args parse with the
    real binary (clap rejects an unknown flag or a bad value before --help)."""
    if not BINARY.exists():
        pytest.skip(f"build the binary first: {BINARY}")
    docs = render(VALUE_SETS[name])
    checked = 0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet") or doc["metadata"]["name"].endswith("-etcd"):
            continue
        c = doc["spec"]["template"]["spec"]["containers"][0]
        variables = {"POD_IP": "10.0.0.7"}
        args = [expand(a, variables) for a in c["args"]]
        run = subprocess.run([str(BINARY), *args, "--help"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, f"{doc['metadata']['name']}: {args}\n{run.stderr}"
        checked += 1
    assert checked >= 3


def test_config_values_become_flags():
    docs = render(EVERYTHING)
    router = container(docs, "Deployment", "prod-myriad-router")["args"]
    assert router[0] == "router"
    assert "--max-batch=64" in router and "--max-model-len=131072" in router
    assert "--served-model-name=deepseek-v4" in router
    assert "--expert-timeout=30s" in router
    # Null keeps the binary's default: the default values give no --max-model-len.
    assert not [a for a in container(render(), "Deployment", "prod-myriad-router")["args"] if "max-model-len" in a]
    coordinator = container(docs, "Deployment", "prod-myriad-coordinator")["args"]
    assert "--redundant=4" in coordinator and "--admin-advertise=$(POD_IP):7200" in coordinator
    assert "--max-move=20GiB" in coordinator and "--move-tolerance=0.01" in coordinator
    # Every expert on two workers by default, so one worker's restart costs no request.
    assert "--replicas=2" in container(render(), "Deployment", "prod-myriad-coordinator")["args"]
    worker = container(render(GPU), "StatefulSet", "prod-myriad-worker")["args"]
    assert "--capacity=70GiB" in worker and "--advertise-addr=$(POD_IP):7100" in worker
    # GPU workers compute on their GPU; the default ones on the CPU.
    assert "--device=cuda" in worker
    assert "--device=cpu" in container(render(), "StatefulSet", "prod-myriad-worker")["args"]
    # A worker whose experts fail to load tries again by itself: no restart.
    assert "--load-retry=10s" in worker


def test_kvcache_instances_register_and_routers_spread_conversations_over_them():
    docs = render({"kvcache": {"replicas": 3, "copies": 2}})
    kvcache = find(docs, "StatefulSet", "prod-myriad-kvcache")
    assert kvcache["spec"]["replicas"] == 3
    args = kvcache["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--advertise-addr=$(POD_IP):7300" in args
    assert "MYRIAD_ETCD" in env(kvcache["spec"]["template"]["spec"]["containers"][0])
    router = container(docs, "Deployment", "prod-myriad-router")["args"]
    assert "--kvcache-from-store" in router and "--kvcache-replicas=2" in router
    with pytest.raises(Exception, match="kvcache.copies"):
        render({"kvcache": {"replicas": 1, "copies": 2}})


def test_workers_report_their_node_and_zone_for_placement():
    worker = container(render({"worker": {"config": {"zone": "rack-a"}}}), "StatefulSet", "prod-myriad-worker")
    assert env(worker)["MYRIAD_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--zone=rack-a" in worker["args"]
    assert not [a for a in container(render(), "StatefulSet", "prod-myriad-worker")["args"] if "zone" in a]


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"worker": {"replica": 3}}, "replica"),
        ({"router": {"config": {"maxBatchSize": 8}}}, "maxBatchSize"),
        ({"router": {"config": {"maxBatch": 0}}}, "maxBatch"),
        ({"coordinator": {"config": {"settle": "two seconds"}}}, "settle"),
        ({"worker": {"config": {"capacity": "lots"}}}, "capacity"),
        # `24G` reads as giga-what to the binary: refused here, not at start-up.
        ({"worker": {"config": {"capacity": "24G"}}}, "capacity"),
        ({"etcd": {"replicas": 2}}, "replicas"),
        ({"model": {"source": "s3"}}, "source"),
        ({"serviceMonitor": {"create": "yes"}}, "create"),
    ],
)
def test_the_schema_rejects_typos_and_bad_values(values, complaint):
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert complaint in str(error.value)


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"worker": {"replicas": 2}, "coordinator": {"config": {"minWorkers": 3}}}, "minWorkers (3) exceeds worker.replicas (2)"),
        ({"worker": {"replicas": 1}}, "coordinator.config.replicas (2) exceeds worker.replicas (1)"),
        ({"router": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}}, "minReplicas (5) exceeds maxReplicas (3)"),
        ({"worker": {"resources": {"limits": {"gpu": 1}}}}, "worker.resources.limits.gpu: extended resources need"),
        ({"etcd": {"endpoints": ["https://etcd:2379"]}}, "set etcd.tls.secret"),
        ({"etcd": {"tls": {"secret": "etcd-client"}}}, "every etcd.endpoints entry must be https://"),
        ({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}, "turn that on too"),
        ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "tls.certManager.issuerRef.name is required"),
        ({"etcd": {"auth": {"user": "myriad"}}}, "etcd.auth.passwordSecret.name is required"),
        ({"router": {"keda": {"enabled": True}}}, "router.keda.serverAddress is required"),
        ({"model": {"download": {"enabled": True, "repository": "a/b"}}}, "set model.source to pvc"),
        ({"model": {"source": "pvc", "claimName": "m", "path": "/models/x", "download": {"enabled": True}}}, "model.download.repository is required"),
        ({"model": {"source": "pvc", "claimName": "m", "path": "/models/x", "download": {"enabled": True, "from": "s3", "repository": "bucket/x"}}}, "must be an s3:// URL"),
        ({"router": {"autoscaling": {"enabled": True}, "keda": {"enabled": True, "serverAddress": "http://p:9090"}}}, "enable one"),
        ({"worker": {"config": {"capacity": "4GiB"}}}, "worker.config.capacity (4GiB) exceeds worker.resources.limits.memory (3Gi)"),
        ({"kvcache": {"config": {"memory": "3GB"}}}, "kvcache.config.memory (3GB) exceeds kvcache.resources.limits.memory (2Gi)"),
        ({"kvcache": {"config": {"diskCapacity": "20GiB"}}}, "kvcache.config.diskCapacity (20GiB) exceeds kvcache.persistence.size (10Gi)"),
        ({"model": {"source": "pvc", "claimName": "m", "path": "/opt/models/x"}}, "model.path (/opt/models/x) is outside model.mountPath (/models)"),
        ({"router": {"resources": {"limits": {"memory": "4GiB"}}}}, "router.resources.limits.memory: `4GiB` is not a Kubernetes quantity"),
        # 6s + 1m + 2s to leave > 60 s of grace; 30 s when unset.
        ({"router": {"config": {"drainTimeout": "1m"}}}, "exceed router.terminationGracePeriodSeconds (60)"),
        ({"router": {"terminationGracePeriodSeconds": None}}, "exceed router.terminationGracePeriodSeconds (30)"),
        ({"router": {"config": {"shutdownDelay": "1m 500ms"}, "terminationGracePeriodSeconds": 100}}, "shutdownDelay (1m 500ms)"),
        # 10 s + 75.5 s + 2 s = 87.5 s (renders with 88: below).
        ({"router": {"config": {"shutdownDelay": "10s", "drainTimeout": "1m15.5s"}, "terminationGracePeriodSeconds": 87}}, "(87)"),
    ],
)
def test_mistakes_between_fields_fail_at_render_time(values, complaint):
    with pytest.raises(helm.HelmError) as error:
        render(values)
    assert complaint in str(error.value)


def test_a_router_stop_that_fits_its_grace_period_renders():
    # 6s + 50s + 2s = 58 s under the default 60 s; 10 s + 1m15.5s + 2s = 87.5 s under 88 s.
    render()
    render({"router": {"config": {"shutdownDelay": "10s", "drainTimeout": "1m15.5s"}, "terminationGracePeriodSeconds": 88}})


def test_required_companions_are_demanded():
    with pytest.raises(helm.HelmError, match="model.claimName"):
        render({"model": {"source": "pvc"}})
    with pytest.raises(helm.HelmError, match="ingress.hosts"):
        render({"router": {"ingress": {"enabled": True}}})


def test_router_probes_use_health_and_ready():
    c = container(render(), "Deployment", "prod-myriad-router")
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
    ]
    service = find(render(), "Service", "prod-myriad-router")
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_workers_are_ready_only_when_they_serve_the_current_placement():
    """Their readiness is the worker's gRPC health (SERVING once the current
    placement names it and it has loaded it), so a rolling update waits."""
    c = container(render(), "StatefulSet", "prod-myriad-worker")
    assert c["readinessProbe"]["grpc"] == {"port": 7100}
    assert c["ports"][0]["containerPort"] == 7100


def test_every_role_finds_etcd_and_the_model():
    for values, endpoints in [({}, "http://prod-myriad-etcd:2379"), (EVERYTHING, "http://etcd-a.infra:2379,http://etcd-b.infra:2379")]:
        docs = render(values)
        for kind, name in [("Deployment", "prod-myriad-coordinator"), ("StatefulSet", "prod-myriad-worker"), ("Deployment", "prod-myriad-router")]:
            e = env(container(docs, kind, name))
            assert e["MYRIAD_ETCD"]["value"] == endpoints
            assert e["MYRIAD_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            assert e["MYRIAD_MODEL"]["value"] == (values.get("model", {}).get("path") or "/opt/myriad/models/tiny-v4")
    docs = render(EVERYTHING)
    assert not [d for d in docs if d["metadata"]["name"].startswith("prod-myriad-etcd")], "an external etcd bundles none"
    pod = find(docs, "StatefulSet", "prod-myriad-worker")["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]


def test_a_three_member_etcd_names_each_member():
    docs = render({"etcd": {"replicas": 3}})
    etcd = find(docs, "StatefulSet", "prod-myriad-etcd")
    assert etcd["spec"]["replicas"] == 3 and etcd["spec"]["podManagementPolicy"] == "Parallel"
    args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    cluster = next(a for a in args if a.startswith("--initial-cluster="))
    members = cluster.split("=", 1)[1].split(",")
    domain = "prod-myriad-etcd-peers.ml.svc.cluster.local"
    assert members == [f"prod-myriad-etcd-{i}=http://prod-myriad-etcd-{i}.{domain}:2380" for i in range(3)]
    assert find(docs, "Service", "prod-myriad-etcd-peers")["spec"]["clusterIP"] == "None"
    assert find(docs, "PodDisruptionBudget", "prod-myriad-etcd")["spec"]["maxUnavailable"] == 1
    # Drained (unready) workers never hold up `kubectl drain`.
    assert find(docs, "PodDisruptionBudget", "prod-myriad-worker")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_secrets_reach_the_roles_that_need_them():
    docs = render(EVERYTHING)
    keys = find(docs, "Secret", "prod-myriad-api-keys")
    assert keys["stringData"] == {"api-keys": "key-a,key-b"}
    ref = env(container(docs, "Deployment", "prod-myriad-router"))["MYRIAD_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "prod-myriad-api-keys", "key": "api-keys"}
    ref = env(container(docs, "Deployment", "prod-myriad-coordinator"))["MYRIAD_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "prod-myriad-admin-token", "key": "admin-token"}
    # An existing Secret is used as it is; the chart makes none.
    docs = render({"router": {"apiKeys": {"existingSecret": "keys", "key": "k"}}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    ref = env(container(docs, "Deployment", "prod-myriad-router"))["MYRIAD_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "keys", "key": "k"}
    # No key anywhere: no secret and no variable.
    assert "MYRIAD_API_KEYS" not in env(container(render(), "Deployment", "prod-myriad-router"))


def test_ingress_tls_autoscaling_and_pod_monitor():
    docs = render(EVERYTHING)
    ingress = find(docs, "Ingress", "prod-myriad-router")
    assert ingress["spec"]["tls"] == [{"secretName": "myriad-tls", "hosts": ["myriad.example.com"]}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "prod-myriad-router", "port": {"name": "http"}}
    hpa = find(docs, "HorizontalPodAutoscaler", "prod-myriad-router")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "prod-myriad-router"
    assert "replicas" not in find(docs, "Deployment", "prod-myriad-router")["spec"], "the HPA owns the count"
    # Every role serves /metrics on a port of its own, scraped per pod; the
    # router's API port (behind the Service and Ingress) does not.
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]
    pods = find(docs, "PodMonitor", "prod-myriad")["spec"]
    assert pods["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pods["selector"]["matchExpressions"][0]["values"] == ["router", "worker", "coordinator", "kvcache"]
    for kind, role in [("Deployment", "router"), ("StatefulSet", "worker"), ("Deployment", "coordinator"), ("StatefulSet", "kvcache")]:
        c = find(docs, kind, f"prod-myriad-{role}")["spec"]["template"]["spec"]["containers"][0]
        assert "--metrics-listen=0.0.0.0:9400" in c["args"], role
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in c["ports"], role
    service_ports = find(docs, "Service", "prod-myriad-router")["spec"]["ports"]
    assert [p["targetPort"] for p in service_ports] == ["http"], "the router Service exposes the API port only"
    assert "https://myriad.example.com/v1" in notes(EVERYTHING)


def metric_names_in_the_code():
    """Every metric name a Rust source of the project defines."""
    names = set()
    for path in (ROOT).glob("*/src/**/*.rs"):
        names.update(re.findall(r'"(myriad_[a-z_]+)"', path.read_text()))
    return names


def used_metrics(expr):
    """Metric names in a PromQL expression (histogram series by family)."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\b(myriad_[a-z_]+)", expr)}


def test_alerts_and_dashboard_use_metrics_that_exist():
    defined = metric_names_in_the_code()
    docs = render(EVERYTHING)
    rules = find(docs, "PrometheusRule", "prod-myriad")["spec"]["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"MyriadNoReadyRouter", "MyriadExpertWithoutLiveCopy", "MyriadRolloutStuck",
                                          "MyriadKvcacheCorruptReads", "MyriadLeaseRenewalFailures", "MyriadQueueNearlyFull",
                                          "MyriadWorkerCannotLoadExperts", "MyriadWorkerLoadTimedOut"}
    for rule in rules:
        assert used_metrics(rule["expr"]) <= defined, rule
        assert 'namespace="ml"' in rule["expr"], rule
    assert "> 204" in next(r["expr"] for r in rules if r["alert"] == "MyriadQueueNearlyFull"), "80% of maxQueue"
    dashboard = json.loads(find(docs, "ConfigMap", "prod-myriad-dashboard")["data"]["myriad.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    for expr in exprs:
        assert used_metrics(expr) <= defined, expr


def test_gpu_workers_ask_for_gpus_on_gpu_nodes():
    docs = render(GPU)
    pod = find(docs, "StatefulSet", "prod-myriad-worker")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] == "myriad:0.1.0-cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Only the workers: routers keep the CPU image.
    assert container(docs, "Deployment", "prod-myriad-router")["image"] == "myriad:0.1.0"


def peers(rule):
    """The components a NetworkPolicy rule names, or None for everyone."""
    if "from" not in rule and "to" not in rule:
        return None
    names = set()
    for peer in rule.get("from", rule.get("to", [])):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        names.add(labels.get("app.kubernetes.io/component") or ("admin-client" if "myriad.dev/admin-client" in labels else "?"))
    return names


def test_network_policies_let_each_role_reach_only_what_it_needs():
    docs = render()
    policy = {d["metadata"]["name"].removeprefix("prod-myriad-"): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policy) == {"worker", "router", "coordinator", "kvcache", "etcd"}
    for spec in policy.values():
        assert spec["policyTypes"] == ["Ingress", "Egress"]

    def ingress(role):
        return [(r["ports"][0]["port"], peers(r)) for r in policy[role]["ingress"]]

    # Prometheus scrapes every role on its metrics port.
    assert ingress("worker") == [("experts", {"router", "coordinator"}), ("metrics", None)]
    assert ingress("router") == [("http", None), ("metrics", None)]
    assert ingress("coordinator") == [("admin", {"coordinator", "admin-client"}), ("metrics", None)]
    assert ingress("kvcache") == [("kvcache", {"router", "coordinator", "admin-client"}), ("metrics", None)]
    assert ingress("etcd")[0] == ("client", {"coordinator", "worker", "router", "kvcache", "admin-client"})
    assert ingress("etcd")[1] == ("peer", {"etcd"})

    def egress(role):
        return {r["ports"][0]["port"]: peers(r) for r in policy[role]["egress"]}

    assert egress("worker") == {53: None, 2379: {"etcd"}}
    assert egress("router") == {53: None, 2379: {"etcd"}, 7100: {"worker"}, 7300: {"kvcache"}}
    assert egress("coordinator") == {53: None, 2379: {"etcd"}, 7100: {"worker"}, 7200: {"coordinator"}, 7300: {"kvcache"}}
    # KV-cache instances register in etcd.
    assert egress("kvcache") == {53: None, 2379: {"etcd"}}
    # Limiting who may call the API.
    only = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    docs = render({"networkPolicy": {"routerFrom": only}})
    router = find(docs, "NetworkPolicy", "prod-myriad-router")["spec"]
    assert router["ingress"][0]["from"][0] == only[0]


def test_the_longest_release_name_gives_names_kubernetes_accepts():
    release = "a" * 53  # Helm's limit
    docs = render(EVERYTHING, release)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(set(names)) == len(names), "two objects of a kind share a name"
    for kind, name in names:
        assert len(name) <= 63, f"{kind} {name}: {len(name)} characters"
        if kind == "StatefulSet":
            assert len(name) <= 52, f"{kind} {name}: no room for the revision hash label"
    for d in docs:
        for value in d["metadata"].get("labels", {}).values():
            assert len(str(value)) <= 63, f"label value {value}"


def test_a_limited_router_api_still_lets_this_release_and_prometheus_in():
    only = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    docs = render({"networkPolicy": {"routerFrom": only, "metricsFrom": scrapers}})
    allowed = find(docs, "NetworkPolicy", "prod-myriad-router")["spec"]["ingress"][0]["from"]
    release = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "myriad", "app.kubernetes.io/instance": "prod"}}}
    assert allowed == only + [release]
    for role in ("router", "worker", "coordinator", "kvcache"):
        rules = find(docs, "NetworkPolicy", f"prod-myriad-{role}")["spec"]["ingress"]
        assert {"ports": [{"port": "metrics", "protocol": "TCP"}], "from": scrapers} in rules, role


def test_containers_run_unprivileged():
    for doc in render(EVERYTHING) + render():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["resources"]["requests"]


def test_notes_say_how_to_reach_the_endpoint_and_run_ctl():
    text = notes()
    assert "kubectl port-forward -n ml service/prod-myriad-router 8000:80" in text
    assert "kubectl exec -n ml deploy/prod-myriad-coordinator -- myriad ctl status" in text
    assert "No API keys are configured" in text
    assert "No API keys" not in notes(EVERYTHING)


ROLES = [("Deployment", "coordinator"), ("StatefulSet", "worker"), ("Deployment", "router"), ("StatefulSet", "kvcache")]


def test_tls_gives_every_role_its_certificate_and_etcd_its_login():
    docs = render(SECURED)
    for kind, role in ROLES:
        spec = find(docs, kind, f"prod-myriad-{role}")["spec"]["template"]["spec"]
        c = spec["containers"][0]
        variables = env(c)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        # Its own Secret, mounted where the variables point.
        assert volumes["tls"]["secret"]["secretName"] == f"prod-myriad-{role}-tls", role
        for name, file in [("MYRIAD_TLS_CERT", "tls.crt"), ("MYRIAD_TLS_KEY", "tls.key"), ("MYRIAD_TLS_CA", "ca.crt")]:
            assert variables[name]["value"] == f"{mounts['tls']}/{file}", (role, name)
        assert variables["MYRIAD_TLS_REQUIRE_CLIENT_CERT"]["value"] == "true"
        assert variables["MYRIAD_TLS_SERVER_NAME"]["value"] == "prod-myriad-internal"
        # etcd: its CA and client certificate from the given Secret, the password from its Secret.
        assert volumes["etcd-tls"]["secret"]["secretName"] == "etcd-client"
        assert variables["MYRIAD_ETCD_CA"]["value"] == f"{mounts['etcd-tls']}/ca.crt"
        assert variables["MYRIAD_ETCD_CERT"]["value"] == f"{mounts['etcd-tls']}/tls.crt"
        assert variables["MYRIAD_ETCD_USER"]["value"] == "myriad"
        ref = variables["MYRIAD_ETCD_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "etcd-login", "key": "password"}
        # cert-manager issues it: the checked name, both usages.
        cert = find(docs, "Certificate", f"prod-myriad-{role}")["spec"]
        assert cert["secretName"] == f"prod-myriad-{role}-tls"
        assert cert["dnsNames"][0] == "prod-myriad-internal"
        assert {"server auth", "client auth"} <= set(cert["usages"])
        assert cert["issuerRef"] == {"name": "myriad-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    # The kubelet's gRPC probe speaks no TLS: workers are probed on HTTP.
    probe = container(docs, "StatefulSet", "prod-myriad-worker")["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": "metrics"}
    # A Secret given for a role is used as it is, and not issued.
    given = copy.deepcopy(SECURED)
    given["tls"]["secrets"] = {"worker": "worker-cert"}
    docs = render(given)
    assert find(docs, "StatefulSet", "prod-myriad-worker")["spec"]["template"]["spec"]["volumes"][-2]["secret"] == {
        "secretName": "worker-cert"
    }
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Certificate"} == {
        "prod-myriad-coordinator",
        "prod-myriad-router",
        "prod-myriad-kvcache",
    }
    # Off: no certificates, no TLS variables, the gRPC probe.
    docs = render()
    assert not [d for d in docs if d["kind"] == "Certificate"]
    assert not [n for n in env(container(docs, "StatefulSet", "prod-myriad-worker")) if "TLS" in n]
    assert "grpc" in container(docs, "StatefulSet", "prod-myriad-worker")["readinessProbe"]


def test_grace_periods_update_strategies_and_startup_probes_are_tunable():
    docs = render()
    # Defaults: a worker's grace outlasts its 20 s drain; routers finish responses.
    for kind, role, grace in [("StatefulSet", "worker", 30), ("Deployment", "router", 60)]:
        assert find(docs, kind, f"prod-myriad-{role}")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace
    assert "updateStrategy" not in find(docs, "StatefulSet", "prod-myriad-worker")["spec"]
    values = {
        "worker": {
            "terminationGracePeriodSeconds": 120,
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
            "startupProbe": {"failureThreshold": 720},
        },
        "router": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}},
        "coordinator": {"updateStrategy": {"type": "Recreate"}},
    }
    docs = render(values)
    worker = find(docs, "StatefulSet", "prod-myriad-worker")["spec"]
    assert worker["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert worker["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}}
    assert worker["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] == 720
    assert find(docs, "Deployment", "prod-myriad-router")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert find(docs, "Deployment", "prod-myriad-coordinator")["spec"]["strategy"] == {"type": "Recreate"}
    for doc in docs:
        if doc["kind"] not in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_keda_scales_routers_on_queued_requests():
    values = {"router": {"keda": {"enabled": True, "serverAddress": "http://prometheus-operated.monitoring:9090", "queueDepth": 4}}}
    docs = render(values)
    scaled = find(docs, "ScaledObject", "prod-myriad-router")["spec"]
    assert scaled["scaleTargetRef"] == {"name": "prod-myriad-router"}
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "4"
    assert trigger["metadata"]["query"] == 'sum(myriad_router_queue_depth{namespace="ml", pod=~"prod-myriad-router-.*"})'
    # The metric it reads is one the router exports.
    source = (ROOT / "router" / "src" / "metrics.rs").read_text()
    assert '"myriad_router_queue_depth"' in source
    # KEDA owns the replica count.
    assert "replicas" not in find(docs, "Deployment", "prod-myriad-router")["spec"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]


def test_a_hook_job_fills_the_model_claim_from_hugging_face_or_s3():
    docs = render(DOWNLOADED)
    job = find(docs, "Job", "prod-myriad-model-download")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    variables = env(c)
    assert variables["REPOSITORY"]["value"] == "deepseek-ai/DeepSeek-V4-Flash"
    assert variables["DEST"]["value"] == "/models/DeepSeek-V4-Flash"
    assert variables["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert "snapshot_download" in c["args"][0] and "REPOSITORY" in c["args"][0]
    # It writes the claim the roles mount read-only.
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models"}
    assert {"name": "model", "mountPath": "/models"} in c["volumeMounts"]
    worker = find(docs, "StatefulSet", "prod-myriad-worker")["spec"]["template"]["spec"]
    assert worker["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    # S3: aws s3 sync with the Secret's keys as its environment.
    s3 = copy.deepcopy(DOWNLOADED)
    s3["model"]["download"].update({"from": "s3", "repository": "s3://models/v4-flash/", "secret": "aws"})
    c = find(render(s3), "Job", "prod-myriad-model-download")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("amazon/aws-cli") and "aws s3 sync" in c["args"][0]
    assert c["envFrom"] == [{"secretRef": {"name": "aws"}}]
    assert not [d for d in render() if d["kind"] == "Job"]
