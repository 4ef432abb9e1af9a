"""Deployment files: cluster manifests against the schemas their tools check, job configs
against our config loader, the Grafana dashboard against the metrics we emit, and one real
`ray job submit` to a local, token-authenticated Ray head."""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from sera_ray import metric_names
from sera_ray.cluster import plan_roles
from sera_ray.config import load_config
from sera_ray.metrics import prometheus_name

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
JOBS = ROOT / "jobs"
DASHBOARD = ROOT / "dashboards" / "grafana-sera.json"
JOB_CONFIGS = sorted(JOBS.glob("*.yaml"))

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=Loader)


# Schemas.


def schemas_dir() -> Path:
    """../shared/schemas next to the checkout, or the directory SERA_SCHEMAS_DIR names."""
    named = os.environ.get("SERA_SCHEMAS_DIR")
    for candidate in ([Path(named)] if named else []) + [ROOT.parent / "shared" / "schemas"]:
        if (candidate / "kuberay").is_dir():
            return candidate
    pytest.skip(
        "KubeRay CRD schemas not found: set SERA_SCHEMAS_DIR to a directory holding "
        "kuberay/ray.io_rayclusters.yaml and kuberay/ray.io_rayjobs.yaml, "
        "or check out ../shared/schemas beside the repository"
    )


def strict(schema):
    """A CRD's openAPIV3Schema as the API server applies it with strict field validation:
    fields a schema does not declare are errors (unless it preserves unknown fields).

    jsonschema ignores the `x-kubernetes-*` keys; int-or-string fields already say
    `anyOf: [integer, string]`, and one that does not is given it here.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(crd_file: str, version: str) -> jsonschema.Draft7Validator:
    crd = read_yaml(schemas_dir() / "kuberay" / crd_file)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict(served["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def raycluster_validator():
    return crd_validator("ray.io_rayclusters.yaml", "v1")


@pytest.fixture(scope="module")
def rayjob_validator():
    return crd_validator("ray.io_rayjobs.yaml", "v1")


def errors_of(validator: jsonschema.Draft7Validator, document) -> list[str]:
    return [
        "/".join(str(p) for p in error.absolute_path) + ": " + error.message
        for error in validator.iter_errors(document)
    ]


def ray_launcher_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


# The AWS cluster launcher config.


def test_aws_cluster_config_is_valid_for_the_ray_cluster_launcher():
    config = read_yaml(CLUSTERS / "aws-autoscaler.yaml")
    validator = jsonschema.Draft7Validator(ray_launcher_schema())

    errors = errors_of(validator, config)

    assert errors == []
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_cluster_autoscales_gpu_workers_from_zero_within_its_node_limit():
    config = read_yaml(CLUSTERS / "aws-autoscaler.yaml")

    workers = {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }

    gpu_types = [node for node in workers.values() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no worker type offers GPUs"
    assert all(node["min_workers"] == 0 < node["max_workers"] for node in gpu_types)
    assert sum(node["max_workers"] for node in workers.values()) <= config["max_workers"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0


def test_aws_cluster_setup_installs_the_vllm_extra_and_checks_for_cuda_torch():
    config = read_yaml(CLUSTERS / "aws-autoscaler.yaml")

    setup = "\n".join(config["setup_commands"])

    assert re.search(r"pip install .*sera-ray\[vllm\]", setup)
    assert "torch.version.cuda" in setup
    assert f"ray[default,data]=={ray.__version__}" in setup


def test_a_misspelled_field_is_rejected_by_the_ray_launcher_schema():
    config = read_yaml(CLUSTERS / "aws-autoscaler.yaml")
    config["max_worker"] = config.pop("max_workers")
    validator = jsonschema.Draft7Validator(ray_launcher_schema())

    errors = errors_of(validator, config)

    assert any("max_worker" in error for error in errors)


# KubeRay.


def test_kuberay_raycluster_is_valid_for_the_kuberay_crd(raycluster_validator):
    manifest = read_yaml(CLUSTERS / "kuberay-raycluster.yaml")

    errors = errors_of(raycluster_validator, manifest)

    assert errors == []
    assert manifest["kind"] == "RayCluster"


def test_kuberay_raycluster_autoscales_a_gpu_worker_group_from_zero(raycluster_validator):
    spec = read_yaml(CLUSTERS / "kuberay-raycluster.yaml")["spec"]

    groups = spec["workerGroupSpecs"]

    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in groups if gpu_limit(g) > 0]
    assert gpu_groups and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups)
    assert spec["authOptions"]["mode"] == "token"


def test_kuberay_rayjob_is_valid_and_runs_sera_ray_train_on_the_raycluster(rayjob_validator):
    job = read_yaml(CLUSTERS / "kuberay-rayjob.yaml")
    cluster = read_yaml(CLUSTERS / "kuberay-raycluster.yaml")

    errors = errors_of(rayjob_validator, job)

    assert errors == []
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["sera-ray", "train", "--config"]
    config_in_image = Path(command[3])
    assert (JOBS / config_in_image.name).is_file()
    load_config(JOBS / config_in_image.name, command[4:])


def test_a_misspelled_field_is_rejected_by_the_kuberay_crd(raycluster_validator):
    manifest = copy.deepcopy(read_yaml(CLUSTERS / "kuberay-raycluster.yaml"))
    group = manifest["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")

    errors = errors_of(raycluster_validator, manifest)

    assert any("maxReplica" in error for error in errors)


def test_an_int_or_string_field_accepts_both(raycluster_validator):
    as_string = read_yaml(CLUSTERS / "kuberay-raycluster.yaml")
    as_number = copy.deepcopy(as_string)
    head_limits(as_number)["cpu"] = 8

    errors = errors_of(raycluster_validator, as_string) + errors_of(raycluster_validator, as_number)

    assert head_limits(as_string)["cpu"] == "8"
    assert errors == []


def head_limits(manifest: dict) -> dict:
    return manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]


def gpu_limit(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)


# Job configs.


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=[p.name for p in JOB_CONFIGS])
def test_every_job_config_loads_with_the_config_loader(path):
    config = load_config(path)

    assert config.model.policy
    assert config.data.train


def test_the_toy_job_fits_a_two_core_machine_without_gpus():
    config = load_config(JOBS / "toy-cpu.yaml")

    plan = plan_roles(config, reference_generator=config.bootstrap.candidates != "policy")

    assert sum(resources.num_cpus for _, resources in plan) <= 2
    assert all(resources.num_gpus == 0 for _, resources in plan)
    assert config.generation.backend == "hf"


def test_the_gpu_job_uses_vllm_nccl_zero3_and_eight_learners():
    config = load_config(JOBS / "llama-8b-gpu.yaml")

    assert config.generation.backend == "vllm"
    assert config.sync.transport == "collective"
    assert config.resources.learner.num_gpus > 0  # the driver then picks NCCL over gloo
    assert config.trainer.zero_stage == 3
    assert config.trainer.num_learners == 8


def test_the_gpu_job_fits_each_cluster_at_its_largest():
    config = load_config(JOBS / "llama-8b-gpu.yaml")
    plan = plan_roles(config, reference_generator=config.bootstrap.candidates != "policy")
    aws = read_yaml(CLUSTERS / "aws-autoscaler.yaml")
    kuberay = read_yaml(CLUSTERS / "kuberay-raycluster.yaml")

    gpus_needed = sum(resources.num_gpus for _, resources in plan)
    aws_nodes = [
        node for node in aws["available_node_types"].values() if node["resources"].get("GPU")
    ]
    aws_gpus = sum(node["resources"]["GPU"] * node["max_workers"] for node in aws_nodes)
    kuberay_groups = kuberay["spec"]["workerGroupSpecs"]
    kuberay_gpus = sum(gpu_limit(g) * g["maxReplicas"] for g in kuberay_groups)

    assert gpus_needed <= aws_gpus
    assert gpus_needed <= kuberay_gpus
    for _, resources in plan:  # every role's bundle fits on one node
        assert any(resources.num_gpus <= node["resources"]["GPU"] for node in aws_nodes)
        assert any(
            resources.num_cpus <= node["resources"]["CPU"]
            and resources.num_gpus <= node["resources"]["GPU"]
            for node in aws_nodes
        )
    assert config.cluster.resource_wait_seconds >= 600  # GPU nodes take minutes to boot


def test_the_submit_script_submits_sera_ray_train_with_the_working_directory():
    script = (JOBS / "submit.sh").read_text()

    result = subprocess.run(["bash", "-n", str(JOBS / "submit.sh")], capture_output=True)

    assert result.returncode == 0, result.stderr
    assert "ray job submit --address" in script
    assert "--working-dir ." in script
    assert "-- sera-ray train --config" in script
    assert "RAY_AUTH_MODE" in script


# Metric names and the dashboard.


def exported(name: str) -> str:
    """The Prometheus name Ray's metrics agent scrapes for one of our metric keys."""
    return metric_names.RAY_EXPORT_PREFIX + prometheus_name(name)


def sera_sources() -> dict[Path, str]:
    package = ROOT / "sera_ray"
    return {
        path: path.read_text() for path in package.rglob("*.py") if path.name != "metric_names.py"
    }


def test_every_listed_metric_is_written_somewhere_in_sera_ray():
    text = "\n".join(sera_sources().values())

    missing = [
        name for name in metric_names.EMITTED if f'"{name}"' not in text and f"'{name}'" not in text
    ]

    assert missing == []


def test_every_namespaced_metric_key_in_sera_ray_is_listed():
    keys = set()
    for text in sera_sources().values():
        keys |= set(re.findall(r"[\"']((?:rewards|sync|time)/[a-z_]+)[\"']", text))

    # Booleans are written to metrics.jsonl but never exported as gauges.
    unlisted = keys - set(metric_names.EMITTED) - {"sync/verified"}

    assert unlisted == set()


def test_every_stage_of_the_driver_is_listed_and_nothing_else():
    driver = (ROOT / "sera_ray" / "driver.py").read_text()

    stages = set(re.findall(r"_stage\(\"([a-z_]+)\"", driver))

    assert stages == set(metric_names.STAGES)


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_every_metric_the_dashboard_queries_is_one_we_emit():
    known = {exported(name) for name in metric_names.EMITTED}

    queried = {m for expr in dashboard_exprs() for m in re.findall(r"\bray_sera_\w+", expr)}
    stages = {s for expr in dashboard_exprs() for s in re.findall(r'stage="([a-z_]+)"', expr)}

    assert queried and queried <= known
    assert stages <= set(metric_names.STAGES)


def test_the_dashboard_has_a_panel_for_each_headline_metric():
    headline = [
        "loss",
        "rewards/margins",
        "rewards/accuracies",
        "rewards/chosen",
        "rewards/rejected",
        "sync/seconds",
        "sync/bytes",
        "sync/probe_max_diff",
        "seconds",
    ]

    queried = " ".join(dashboard_exprs())

    assert [name for name in headline if not re.search(rf"\b{exported(name)}\b", queried)] == []
    assert re.search(r"by \(stage\)", queried)


def test_the_dashboard_panels_have_unique_ids_and_a_prometheus_datasource():
    dashboard = json.loads(DASHBOARD.read_text())

    ids = [panel["id"] for panel in dashboard["panels"]]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    assert len(ids) == len(set(ids))
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel.get("targets"):
            assert panel["datasource"]["uid"] == "${datasource}"


# A real job on a local Ray head with token authentication.


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalHead:
    """`ray start --head --block` in its own session, with its own ports, temp dir and token.

    It is stopped by signalling that process (and, if it lingers, its process group) rather
    than with `ray stop`, which stops every Ray process of the user on the machine.
    """

    def __init__(self, tmp: Path):
        self.tmp = tmp
        gcs, self.dashboard_port, agent, client, self.metrics_port = free_ports(5)
        self.token_path = tmp / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        (tmp / "home").mkdir()
        self.log = tmp / "ray-start.log"
        # Ray's sockets live under its temp dir, and a Unix socket path has at most 107 bytes:
        # pytest's temp paths are too long for it.
        self.ray_temp = Path(tempfile.mkdtemp(prefix="sera-ray-", dir="/tmp"))
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            f"--metrics-export-port={self.metrics_port}",
            "--num-cpus=4",
            f"--temp-dir={self.ray_temp}",
        ]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                command,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def env(self, token: bool = True) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RAY_AUTH_", "RAY_ADDRESS"))
        }
        env.update(HOME=str(self.tmp / "home"), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
        # The dashboard (and with it the job server) starts slowly on a busy 2-core machine.
        env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "180")
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        return env

    def ray(self, *args: str, token: bool = True, timeout: float = 60):
        command = [str(Path(sys.executable).parent / "ray"), *args]
        return subprocess.run(
            command, env=self.env(token), capture_output=True, text=True, timeout=timeout
        )

    def wait_until_up(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{self.log.read_text()[-3000:]}")
            if "block forever" in self.log.read_text():
                return
            time.sleep(1)
        raise TimeoutError(f"ray start did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # ray start drains and stops its children
            try:
                self.process.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.ray_temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    # On a busy machine the head can give up while starting (its Ray Client server waits only
    # 30 s for the raylet, which starts after the dashboard); a second try usually succeeds.
    for attempt in (1, 2):
        head = LocalHead(tmp_path_factory.mktemp("ray-head"))
        try:
            head.wait_until_up()
            break
        except RuntimeError:
            head.stop()
            if attempt == 2:
                raise
    try:
        yield head
    finally:
        head.stop()


# The job: load a job config from the uploaded working directory, join the cluster through
# sera_ray.cluster.connect, emit one metric through MetricsLogger, and wait until Ray's
# metrics agent exports it under the name the dashboard queries.
JOB_CODE = """
import sys, time, urllib.request
import ray
from sera_ray.cluster import connect
from sera_ray.config import load_config
from sera_ray.metrics import MetricsLogger

config = load_config("jobs/toy-cpu.yaml")
connect(config)
print("SERA_CLUSTER_CPUS", ray.cluster_resources().get("CPU"), flush=True)
MetricsLogger("metrics.jsonl").log({"stage": "sync", "iteration": 1, "sync/seconds": 0.125})
deadline = time.time() + 90
while time.time() < deadline:
    try:
        text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
    except OSError as error:  # the agent's endpoint can be slow to answer on a busy machine
        print("metrics endpoint:", error, flush=True)
        text = ""
    lines = [l for l in text.splitlines() if l.startswith("ray_sera_sync_seconds{")]
    if lines:
        print("SERA_EXPORTED", lines[0], flush=True)
        break
    time.sleep(2)
"""


def submit(head: LocalHead, entrypoint: list[str], timeout: float = 60) -> str:
    """`ray job submit --no-wait`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        result = head.ray(
            "job",
            "submit",
            "--address",
            head.address,
            "--working-dir",
            str(ROOT),
            "--no-wait",
            "--",
            *entrypoint,
        )
        found = re.search(r"raysubmit_\w+", result.stdout + result.stderr)
        if result.returncode == 0 and found:
            return found.group(0)
        if time.monotonic() > deadline or "No available agent" not in result.stderr:
            raise AssertionError(f"ray job submit failed:\n{result.stdout}\n{result.stderr}")
        time.sleep(3)


def wait_for_job(head: LocalHead, job_id: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = head.ray("job", "status", "--address", head.address, job_id)
        # A job that runs says "Status for job '<id>': RUNNING"; one that ended, "Job '<id>'
        # succeeded" (or failed, or stopped).
        found = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", result.stdout)
        if found:
            return found.group(1).upper()
        time.sleep(2)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


@pytest.mark.slow
def test_ray_job_submit_with_the_token_runs_sera_ray_on_the_cluster(local_head):
    entrypoint = [sys.executable, "-c", JOB_CODE, f"http://127.0.0.1:{local_head.metrics_port}"]

    job_id = submit(local_head, entrypoint)
    status = wait_for_job(local_head, job_id)
    logs = local_head.ray("job", "logs", "--address", local_head.address, job_id).stdout

    assert status == "SUCCEEDED", logs
    printed = logs.splitlines()  # what the job printed, after Ray's echo of its entrypoint
    assert "SERA_CLUSTER_CPUS 4.0" in printed
    exported_line = next(line for line in printed if line.startswith("SERA_EXPORTED "))
    assert exported_line.startswith("SERA_EXPORTED ray_sera_sync_seconds{")
    assert 'stage="sync"' in exported_line
    assert exported_line.rstrip().endswith(" 0.125")


@pytest.mark.slow
def test_ray_job_commands_without_the_token_are_refused(local_head):
    local_head.wait_until_up()

    result = local_head.ray("job", "list", "--address", local_head.address, token=False)

    assert result.returncode != 0
    assert "Unauthorized" in result.stdout + result.stderr
