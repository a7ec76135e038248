"""The files in cluster/ are what a cluster accepts, checked by parsing alone (no network, no Ray start).

- `ray up` configs: validated against the autoscaler JSON schema inside the installed `ray` package
  (ray/autoscaler/ray-schema.json, Draft 7, what `ray up` itself validates with), and then put through
  Ray's own offline preparation (`prepare_config`, `validate_config`: defaults merged, the local provider's
  rules applied) that `ray up` runs before it contacts any provider.
- KubeRay manifests: the fields KubeRay's CRDs require, transcribed from ray-project/kuberay
  (ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, openAPIV3Schema of v1:
  spec.required = [headGroupSpec], headGroupSpec.required = [template], workerGroupSpecs[].required =
  [groupName, maxReplicas, minReplicas, template], podSpec.required = [containers], container.required =
  [name], volumeMount.required = [mountPath, name], rayStartParams values of type string), the operator's
  own checks (ray-operator/controllers/ray/utils/validation.go: ValidateRayClusterSpec, ValidateRayJobSpec,
  name length 53 / 47 and DNS-1035, token auth needs rayVersion >= 2.52.0, min <= max replicas), how it
  turns a GPU limit into Ray's GPUs (common/pod.go: num-gpus from the nvidia.com/gpu *limit* unless
  rayStartParams sets it), and what eqlab needs of them (an image, the pinned Ray version, a GPU group,
  the results volume in every pod, the RayJob's --results on it).

Every check is shown to reject a copy of the file with one thing broken, by the name of what broke.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = ("ray-cluster.yaml", "ray-cluster-local.yaml")
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def pinned(package: str) -> str:
    """The version requirements.lock pins for ``package``."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", line.split("#")[0].strip())
        if m:
            return m.group(2)
    raise AssertionError(f"requirements.lock pins no {package}")


def eqlab_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert m, "pyproject.toml has no version"
    return m.group(1)


def load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path.name}: not a YAML mapping"
    return doc


# --- `ray up` ------------------------------------------------------------------------------------------

def schema_errors(config: dict) -> list[str]:
    """Every violation of Ray's autoscaler schema, as 'path.to.field: message'."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
                  for e in validator.iter_errors(config))


def ray_up_problems(config: dict) -> list[str]:
    """What `ray up` would refuse before contacting a provider, plus what eqlab needs of a GPU cluster."""
    problems = schema_errors(config)
    if problems:
        return problems
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:  # defaults merged and checked as `ray up` does (`commands._bootstrap_config`), all offline
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as e:  # noqa: BLE001  (click.ClickException for the local provider's own rules)
        return [f"ray up: {type(e).__name__}: {e}"]
    head = config.get("head_start_ray_commands", [])
    if config["provider"]["type"] != "local":
        types = config.get("available_node_types", {})
        gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
        if not gpu:
            problems.append("available_node_types: no node type declares resources.GPU")
        for name, t in gpu.items():
            options = t.get("docker", {}).get("worker_run_options", []) + config.get("docker", {}).get("run_options", [])
            if "docker" in config and not any("--gpus" in o or "--runtime=nvidia" in o for o in options):
                problems.append(f"available_node_types.{name}.docker.worker_run_options: the container gets no "
                                "GPU (no --gpus)")
        head_type = types.get(config.get("head_node_type"), {})
        declared = head_type.get("resources", {}).get("CPU")
        started = re.search(r"--num-cpus[= ](\d+)", " ".join(head))
        if declared is not None and (started is None or int(started.group(1)) != declared):
            problems.append(f"head_start_ray_commands: --num-cpus must match the head type's resources.CPU "
                            f"= {declared} (got {started.group(1) if started else 'none'})")
        image = config.get("docker", {}).get("image")
        if image is not None and image.rsplit(":", 1)[-1] != eqlab_version():
            problems.append(f"docker.image: tag must be eqlab's version {eqlab_version()} (got {image!r})")
    if not any("ray start --head" in c for c in head):
        problems.append("head_start_ray_commands: no `ray start --head`")
    if any(re.search(r"--dashboard-host[= ]0\.0\.0\.0", c) for c in head):
        problems.append("head_start_ray_commands: the dashboard (Jobs API) must stay on 127.0.0.1 "
                        "(reach it with `ray dashboard`)")
    return problems


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_is_valid(name):
    assert ray_up_problems(load(CLUSTER / name)) == []


def test_ray_up_config_declares_an_8_gpu_worker_type():
    types = load(CLUSTER / "ray-cluster.yaml")["available_node_types"]
    assert {n: t["resources"].get("GPU") for n, t in types.items() if t["resources"].get("GPU")} == {"gpu8": 8}


def _drop(doc: dict, path: tuple):
    *parent, last = path
    for key in parent:
        doc = doc[key]
    del doc[last]


def _set(doc: dict, path: tuple, value):
    *parent, last = path
    for key in parent:
        doc = doc[key]
    doc[last] = value


RAY_UP_BREAKS = [
    # (file, what is done, path, value or None to delete, a word the complaint must contain)
    ("ray-cluster.yaml", ("provider", "type"), None, "'type' is a required property"),
    ("ray-cluster.yaml", ("cluster_name",), None, "'cluster_name' is a required property"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "resources"), None, "'resources' is a required property"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "resources", "GPU"), "8", "available_node_types.gpu8.resources.GPU"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "resources", "GPU"), 0, "no node type declares resources.GPU"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "min_workers"), "0", "available_node_types.gpu8.min_workers"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "docker"), None, "gpu8.docker.worker_run_options"),
    ("ray-cluster.yaml", ("available_node_types", "gpu8", "nvidia_gpus"), 8, "Additional properties"),
    ("ray-cluster.yaml", ("head_node_type",), "nosuchtype", "ray up"),
    ("ray-cluster.yaml", ("available_node_types", "head", "resources", "CPU"), 4, "--num-cpus must match"),
    ("ray-cluster.yaml", ("docker", "image"), "eqlab:0.0.9", "docker.image"),
    ("ray-cluster.yaml", ("setup_commands",), "pip install .", "setup_commands"),
    ("ray-cluster-local.yaml", ("available_node_types",), {"gpu": {"node_config": {}, "resources": {"GPU": 8}}},
     "not supported for on-premise clusters"),
    ("ray-cluster-local.yaml", ("head_start_ray_commands",), ["ray start --head --dashboard-host=0.0.0.0"],
     "must stay on 127.0.0.1"),
]


@pytest.mark.parametrize("name,path,value,complaint", RAY_UP_BREAKS,
                         ids=[f"{b[0]}:{'.'.join(map(str, b[1]))}" for b in RAY_UP_BREAKS])
def test_a_broken_ray_up_config_is_rejected_by_name(tmp_path, name, path, value, complaint):
    config = load(CLUSTER / name)
    _drop(config, path) if value is None else _set(config, path, value)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(config))  # the check reads a file, as `ray up` would
    problems = ray_up_problems(load(broken))
    assert any(complaint in p for p in problems), problems


# --- KubeRay ---------------------------------------------------------------------------------------------

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
NAME_LIMIT = {"RayCluster": 53, "RayJob": 47}  # MaxRayClusterNameLength, MaxRayJobNameLength (= 53 - 6)
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
GPU = "nvidia.com/gpu"


class Problems(list):
    def need(self, table, key, where, kind=None):
        """``table[key]`` exists (and has type ``kind``); returns it or None, noting the field's path."""
        if not isinstance(table, dict) or key not in table or table[key] is None:
            self.append(f"{where}.{key}: required field is missing")
            return None
        wrong_type = kind is not None and not isinstance(table[key], kind)
        if wrong_type or (kind is int and isinstance(table[key], bool)):  # YAML's true is an int to Python
            self.append(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {table[key]!r}")
            return None
        return table[key]


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _pod(p: Problems, group: dict, where: str) -> dict | None:
    """The group's pod spec with its containers checked; None if there is none."""
    template = p.need(group, "template", where, dict)
    spec = p.need(template, "spec", f"{where}.template", dict) if template is not None else None
    if spec is None:
        return None
    containers = p.need(spec, "containers", f"{where}.template.spec", list)
    if containers is not None and not containers:
        p.append(f"{where}.template.spec.containers: at least one container is needed")
    volumes = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, dict)}
    for i, v in enumerate(spec.get("volumes") or []):
        vw = f"{where}.template.spec.volumes[{i}]"
        p.need(v, "name", vw, str)
        if isinstance(v, dict) and "persistentVolumeClaim" in v:
            p.need(v["persistentVolumeClaim"], "claimName", f"{vw}.persistentVolumeClaim", str)
    for i, c in enumerate(containers or []):
        cw = f"{where}.template.spec.containers[{i}]"
        p.need(c, "name", cw, str)
        p.need(c, "image", cw, str)  # optional in the CRD's pod template, required to create the pod
        for kind in ("limits", "requests"):
            for res, q in ((c.get("resources") or {}).get(kind) or {}).items():
                if isinstance(q, bool) or not isinstance(q, (int, str)) or not QUANTITY.fullmatch(str(q)):
                    p.append(f"{cw}.resources.{kind}.{res}: not a Kubernetes quantity ({q!r})")
        for j, m in enumerate(c.get("volumeMounts") or []):
            mw = f"{cw}.volumeMounts[{j}]"
            name = p.need(m, "name", mw, str)
            p.need(m, "mountPath", mw, str)
            if name is not None and name not in volumes:
                p.append(f"{mw}.name: no volume {name!r} in the pod")
    return spec


def _gpus(container: dict, where: str, p: Problems) -> int:
    """The container's nvidia.com/gpu limit (0 without); a request must equal it (extended resources)."""
    res = container.get("resources") or {}
    limit, request = (res.get("limits") or {}).get(GPU), (res.get("requests") or {}).get(GPU)
    if request is not None and str(request) != str(limit):
        p.append(f"{where}.resources.requests.{GPU}: must equal the limit for an extended resource "
                 f"({request!r} vs {limit!r})")
    if limit is None:
        return 0
    if not re.fullmatch(r"\d+", str(limit)):
        p.append(f"{where}.resources.limits.{GPU}: whole GPUs only (got {limit!r})")
        return 0
    return int(limit)


def _mounts(spec: dict) -> dict[str, str]:
    """mountPath -> PVC claim name, over every container of a pod spec."""
    claims = {v["name"]: v["persistentVolumeClaim"].get("claimName") for v in spec.get("volumes") or []
              if isinstance(v, dict) and "name" in v and isinstance(v.get("persistentVolumeClaim"), dict)}
    return {m["mountPath"]: claims[m["name"]] for c in spec.get("containers") or [] if isinstance(c, dict)
            for m in c.get("volumeMounts") or [] if isinstance(m, dict) and m.get("name") in claims and "mountPath" in m}


def raycluster_spec_problems(spec: dict, where: str, p: Problems) -> dict[str, dict]:
    """A RayClusterSpec (a RayCluster's spec or a RayJob's rayClusterSpec); returns every pod spec by group."""
    pods = {}
    version = p.need(spec, "rayVersion", where, str)
    if version is not None and version != pinned("ray"):
        p.append(f"{where}.rayVersion: must be the Ray of requirements.lock, {pinned('ray')} (got {version})")
    mode = (spec.get("authOptions") or {}).get("mode")
    if mode not in (None, "token", "disabled"):
        p.append(f"{where}.authOptions.mode: must be token or disabled (got {mode!r})")
    if mode == "token" and version and _version(version) < (2, 52, 0):
        p.append(f"{where}.rayVersion: token authentication needs Ray >= 2.52.0 (got {version})")
    head = p.need(spec, "headGroupSpec", where, dict)
    if head is not None:
        hw = f"{where}.headGroupSpec"
        params = p.need(head, "rayStartParams", hw, dict)  # required by KubeRay < 1.4; eqlab sets num-cpus
        for k, v in (params or {}).items():
            if not isinstance(v, str):
                p.append(f"{hw}.rayStartParams.{k}: must be a string (got {v!r})")
        if params is not None and params.get("num-cpus") != "0":
            p.append(f"{hw}.rayStartParams.num-cpus: must be \"0\": the head runs the driver, not study work")
        pods["head"] = _pod(p, head, hw)
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        p.append(f"{where}.workerGroupSpecs: required field is missing (no worker group)")
        groups = []
    seen, gpu_groups = set(), 0
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        name = p.need(g, "groupName", gw, str)
        if name in seen:
            p.append(f"{gw}.groupName: {name!r} is used twice")
        seen.add(name)
        lo, hi = p.need(g, "minReplicas", gw, int), p.need(g, "maxReplicas", gw, int)
        n = g.get("replicas", 0) if isinstance(g, dict) else 0
        if isinstance(n, bool) or not isinstance(n, int):
            p.append(f"{gw}.replicas: expected int, got {n!r}")
        elif lo is not None and hi is not None:
            if not 0 <= lo <= hi:
                p.append(f"{gw}.minReplicas: must satisfy 0 <= minReplicas <= maxReplicas ({lo}, {hi})")
            elif not lo <= n <= hi:
                p.append(f"{gw}.replicas: must lie in [minReplicas, maxReplicas] = [{lo}, {hi}] (got {n})")
        params = p.need(g, "rayStartParams", gw, dict)
        for k, v in (params or {}).items():
            if not isinstance(v, str):
                p.append(f"{gw}.rayStartParams.{k}: must be a string (got {v!r})")
        pod = _pod(p, g, gw)
        pods[name or f"group{i}"] = pod
        if pod is None:
            continue
        containers = [c for c in pod.get("containers") or [] if isinstance(c, dict)]
        gpus = _gpus(containers[0], f"{gw}.template.spec.containers[0]", p) if containers else 0
        declared = (params or {}).get("num-gpus")
        if declared is not None and declared != str(gpus):
            p.append(f"{gw}.rayStartParams.num-gpus: {declared!r} but the container's {GPU} limit is {gpus} "
                     "(KubeRay derives num-gpus from the limit; Ray would schedule on GPUs that are not there)")
        gpu_groups += gpus > 0
    if groups and not gpu_groups:
        p.append(f"{where}.workerGroupSpecs: no worker group requests {GPU}")
    images = {c.get("image") for pod in pods.values() if pod for c in pod.get("containers") or []
              if isinstance(c, dict) and c.get("image")}
    want = f"eqlab:{eqlab_version()}"
    if images and {i.rsplit("/", 1)[-1] for i in images} != {want}:
        p.append(f"{where}: every pod must run one image, eqlab's {want} (got {sorted(images)})")
    return pods


def results_mount(pods: dict[str, dict], where: str, p: Problems) -> str | None:
    """The path every pod mounts the same results claim at (Ray Train writes checkpoints there and every
    Hessian actor reads them: a pod without it cannot take part)."""
    mounts = {g: _mounts(pod) for g, pod in pods.items() if pod is not None}
    common = set.intersection(*({(path, claim) for path, claim in m.items()} for m in mounts.values())) \
        if mounts else set()
    if len(common) != 1:
        p.append(f"{where}: every pod ({', '.join(mounts)}) must mount one shared results volume at one path "
                 f"(mounts: {mounts})")
        return None
    return common.pop()[0]


def kuberay_problems(doc: dict) -> list[str]:
    p = Problems()
    if doc.get("apiVersion") != "ray.io/v1":
        p.append(f"apiVersion: must be ray.io/v1 (got {doc.get('apiVersion')!r})")
    kind = doc.get("kind")
    if kind not in NAME_LIMIT:
        p.append(f"kind: must be RayCluster or RayJob (got {kind!r})")
        return p
    name = p.need(doc.get("metadata") or {}, "name", "metadata", str)
    if name is not None and (len(name) > NAME_LIMIT[kind] or not DNS_1035.fullmatch(name)):
        p.append(f"metadata.name: a DNS-1035 label of at most {NAME_LIMIT[kind]} characters (got {name!r})")
    spec = p.need(doc, "spec", "", dict)
    if spec is None:
        return p
    if kind == "RayCluster":
        results_mount(raycluster_spec_problems(spec, "spec", p), "spec", p)
        return p
    entry = p.need(spec, "entrypoint", "spec", str)
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        p.append(f"spec.submissionMode: one of {', '.join(SUBMISSION_MODES)} (got {mode!r})")
    for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (key == "activeDeadlineSeconds")):
            p.append(f"spec.{key}: must be a {'positive' if key == 'activeDeadlineSeconds' else 'non-negative'} "
                     f"integer (got {v!r})")
    cluster = p.need(spec, "rayClusterSpec", "spec", dict)  # no clusterSelector: the job brings its cluster
    if cluster is None:
        return p
    mount = results_mount(raycluster_spec_problems(cluster, "spec.rayClusterSpec", p), "spec.rayClusterSpec", p)
    if entry:
        argv = shlex.split(entry)
        if argv[:2] != ["eqlab", "run"] and argv[:2] != ["eqlab", "reproduce"]:
            p.append(f"spec.entrypoint: must run an eqlab study (got {entry!r})")
        if "--address" not in argv or argv[argv.index("--address") + 1:][:1] != ["auto"]:
            p.append("spec.entrypoint: must join the job's cluster (--address auto), not start its own")
        results = argv[argv.index("--results") + 1] if "--results" in argv[:-1] else None
        if results is None:
            p.append("spec.entrypoint: --results is missing (the tables would stay in the head pod)")
        elif mount and not (results == mount or results.startswith(mount.rstrip("/") + "/")):
            p.append(f"spec.entrypoint: --results {results} is not on the results volume (mounted at {mount})")
    return p


MANIFESTS = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifest_has_what_kuberay_and_eqlab_need(name):
    assert kuberay_problems(load(CLUSTER / name)) == []


def test_both_manifests_mount_the_same_results_claim_at_the_same_path():
    raycluster, rayjob = (load(CLUSTER / n) for n in MANIFESTS)
    p = Problems()
    a = results_mount(raycluster_spec_problems(raycluster["spec"], "rc", p), "rc", p)
    b = results_mount(raycluster_spec_problems(rayjob["spec"]["rayClusterSpec"], "rj", p), "rj", p)
    assert p == [] and a == b == "/results"


WS = ("spec", "workerGroupSpecs")
JS = ("spec", "rayClusterSpec")
GPU_CONTAINER = WS + (0, "template", "spec", "containers", 0)
KUBERAY_BREAKS = [
    ("kuberay-raycluster.yaml", ("apiVersion",), "ray.io/v1alpha1", "apiVersion"),
    ("kuberay-raycluster.yaml", ("kind",), "RayClusters", "kind"),
    ("kuberay-raycluster.yaml", ("metadata", "name"), None, "metadata.name: required"),
    ("kuberay-raycluster.yaml", ("metadata", "name"), "Eqlab_cluster", "DNS-1035"),
    ("kuberay-raycluster.yaml", ("spec", "headGroupSpec"), None, "spec.headGroupSpec: required"),
    ("kuberay-raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams"), None, "headGroupSpec.rayStartParams"),
    ("kuberay-raycluster.yaml", ("spec", "headGroupSpec", "template"), None, "headGroupSpec.template: required"),
    ("kuberay-raycluster.yaml", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "image"), None,
     "headGroupSpec.template.spec.containers[0].image"),
    ("kuberay-raycluster.yaml", ("spec", "headGroupSpec", "template", "spec", "containers"), [], "at least one"),
    ("kuberay-raycluster.yaml", ("spec", "rayVersion"), "2.51.0", "rayVersion"),
    ("kuberay-raycluster.yaml", WS + (0, "groupName"), None, "workerGroupSpecs[0].groupName"),
    ("kuberay-raycluster.yaml", WS + (1, "groupName"), "gpu", "used twice"),
    ("kuberay-raycluster.yaml", WS + (0, "minReplicas"), None, "workerGroupSpecs[0].minReplicas: required"),
    ("kuberay-raycluster.yaml", WS + (0, "maxReplicas"), None, "workerGroupSpecs[0].maxReplicas: required"),
    ("kuberay-raycluster.yaml", WS + (0, "maxReplicas"), "4", "workerGroupSpecs[0].maxReplicas: expected int"),
    ("kuberay-raycluster.yaml", WS + (0, "replicas"), 9, "workerGroupSpecs[0].replicas: must lie"),
    ("kuberay-raycluster.yaml", WS + (0, "minReplicas"), 5, "0 <= minReplicas <= maxReplicas"),
    ("kuberay-raycluster.yaml", WS + (0, "rayStartParams"), None, "workerGroupSpecs[0].rayStartParams"),
    ("kuberay-raycluster.yaml", WS + (0, "rayStartParams", "num-gpus"), 8, "rayStartParams.num-gpus: must be a string"),
    ("kuberay-raycluster.yaml", WS + (0, "rayStartParams", "num-gpus"), "4", "num-gpus: '4' but"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("resources", "limits", GPU), None, "num-gpus: '8' but"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("resources", "requests", GPU), "4", "must equal the limit"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("resources", "limits", "memory"), "lots", "not a Kubernetes quantity"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("volumeMounts", 0, "mountPath"), None, "mountPath: required"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("volumeMounts", 0, "mountPath"), "/data", "one shared results volume"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("volumeMounts", 0, "name"), "result", "no volume 'result'"),
    ("kuberay-raycluster.yaml", GPU_CONTAINER + ("image",), "eqlab:0.0.9", "one image"),
    ("kuberay-rayjob.yaml", ("spec", "entrypoint"), None, "spec.entrypoint: required"),
    ("kuberay-rayjob.yaml", ("spec", "entrypoint"), "eqlab run --address auto", "--results is missing"),
    ("kuberay-rayjob.yaml", ("spec", "entrypoint"), "eqlab run --address auto --results /tmp/out", "not on the results"),
    ("kuberay-rayjob.yaml", ("spec", "entrypoint"), "eqlab run --results /results/x", "--address auto"),
    ("kuberay-rayjob.yaml", ("spec", "submissionMode"), "K8sMode", "spec.submissionMode"),
    ("kuberay-rayjob.yaml", ("spec", "activeDeadlineSeconds"), 0, "spec.activeDeadlineSeconds"),
    ("kuberay-rayjob.yaml", ("spec", "rayClusterSpec"), None, "spec.rayClusterSpec: required"),
    ("kuberay-rayjob.yaml", JS + ("workerGroupSpecs", 1, "minReplicas"), None, "workerGroupSpecs[1].minReplicas"),
    ("kuberay-rayjob.yaml", JS + ("workerGroupSpecs",), [], "no worker group"),
    ("kuberay-rayjob.yaml", JS + ("workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", GPU),
     "0", "no worker group requests"),
    ("kuberay-rayjob.yaml", JS + ("headGroupSpec", "template", "spec", "volumes"), [], "no volume 'results'"),
]


@pytest.mark.parametrize("name,path,value,complaint", KUBERAY_BREAKS,
                         ids=[f"{b[0]}:{'.'.join(map(str, b[1]))}={b[2]!r}" for b in KUBERAY_BREAKS])
def test_a_broken_kuberay_manifest_is_rejected_by_name(tmp_path, name, path, value, complaint):
    doc = load(CLUSTER / name)
    _drop(doc, path) if value is None else _set(doc, path, value)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(doc))
    problems = kuberay_problems(load(broken))
    assert any(complaint in p for p in problems), problems
