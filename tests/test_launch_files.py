"""The launch files against the validators that will judge them, here, without a cloud.

- cluster/*.yaml (Ray cluster launcher): Ray's own schema, `ray-schema.json`, on the file as
  written, then what `ray up` does before it touches a provider: `prepare_config` (defaults,
  merged commands, node types) and `validate_config`. Only the provider's credentialed look-ups
  (instance types, AMIs, networks) are left out.
- cluster/kuberay/*.yaml: each document against the openAPIV3Schema of its kind and version in
  the KubeRay CRDs (../shared/schemas/kuberay), read as the API server reads it:
  int-or-string, nullable, embedded resources, preserve-unknown-fields, unique list-map keys, and
  unknown fields as errors (kubectl's default, strict field validation). CEL rules
  (x-kubernetes-validations: three immutability rules on updates) are not evaluated.
- The Serve config inside each file: Serve's schema (ServeDeploySchema), then the project's own
  parser: `build_app` as `serve deploy` calls it, ServerConfig's field types, GroupOptions, the
  placement strategy, the residual plan's syntax; deployment overrides must name the app's
  deployment, and label selectors a label that some node of the same file carries.

Every failure is a LaunchFileError whose message starts with the file's name; the negative tests
break a copy of a real file and check that the validator says so.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CRDS = SHARED / "schemas" / "kuberay"
LAUNCHERS = sorted((REPO / "cluster").glob("*.yaml"))
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
APP = "deploy.server:build_app"
INTERCONNECT_LABEL = "ladder.io/interconnect"  # node label: how its GPUs talk (nvlink, pcie)

needs_shared = pytest.mark.skipif(not SHARED.is_dir(),
                                  reason=f"{SHARED} is absent: no KubeRay CRDs to check against")
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


class LaunchFileError(Exception):
    """A launch file that its validator rejects; the message starts with the file's name."""


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _schema_errors(name: str, validator, doc, what: str) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        shown = "; ".join(f"at {_where(e.absolute_path)}: {e.message}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise LaunchFileError(f"{name}: {what}: {shown}{more}")


# -- Ray cluster launcher -----------------------------------------------------------------------

def check_launcher(name: str, config: dict) -> dict:
    """Ray's checks of a cluster-launcher config, as `ray up` applies them; the prepared config."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    if not isinstance(config, dict):
        raise LaunchFileError(f"{name}: not a mapping")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    _schema_errors(name, jsonschema.validators.validator_for(schema)(schema), config,
                   "Ray's cluster schema")
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        raise LaunchFileError(f"{name}: Ray's cluster schema, once prepared: at "
                              f"{_where(e.absolute_path)}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - Ray's own refusal, whatever its type
        raise LaunchFileError(f"{name}: `ray up` would refuse it: {type(e).__name__}: {e}") \
            from None
    return prepared


# -- KubeRay CRDs -------------------------------------------------------------------------------

def k8s_schema(s: dict) -> dict:
    """A CRD's OpenAPI v3 schema node as JSON Schema, with Kubernetes' reading of it."""
    out = dict(s)
    if "properties" in s:
        out["properties"] = {k: k8s_schema(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            out[key] = k8s_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            out[key] = [k8s_schema(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("x-kubernetes-embedded-resource"):
        embedded = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                    "metadata": {"type": "object"}}
        out["properties"] = {**embedded, **out.get("properties", {})}
    if s.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    # a field the schema does not name is pruned, or with strict validation refused: refused here
    if ("properties" in out and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if s.get("nullable"):
        out.pop("nullable")
        return {"anyOf": [out, {"type": "null"}]}
    return out


def _unique_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-map-keys: no two items of the list share their key fields."""
    if not isinstance(instance, list):
        return
    seen = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(item.get(k) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"items {seen[key]} and {i} share {dict(zip(keys, key))}")
            seen.setdefault(key, i)


# OpenAPI 3.0 schema objects follow JSON Schema draft 4 (boolean exclusiveMinimum and so on)
K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _unique_map_keys})


def k8s_validator(openapi: dict) -> jsonschema.protocols.Validator:
    """A validator for a whole object: its openAPIV3Schema, plus what every object needs."""
    schema = k8s_schema(openapi)
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind",
                                                                   "metadata"})
    meta = dict(schema["properties"].get("metadata", {"type": "object"}))
    meta["required"] = ["name"]
    meta.setdefault("properties", {})["name"] = {"type": "string", "minLength": 1}
    schema["properties"] = {**schema["properties"], "metadata": meta}
    return K8sValidator(schema)


@functools.cache
def _crds() -> dict:
    """{(group, kind, version): openAPIV3Schema} of every CRD in ../shared/schemas/kuberay."""
    found = {}
    for f in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(f.read_text(), Loader=Loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for v in spec["versions"]:
                found[spec["group"], spec["names"]["kind"], v["name"]] = \
                    v["schema"]["openAPIV3Schema"]
    return found


@functools.cache
def crd_validator(group: str, kind: str, version: str):
    return k8s_validator(_crds()[group, kind, version])


def check_manifest(name: str, docs: list) -> list[dict]:
    """Every document of a KubeRay manifest against its CRD; the documents."""
    docs = [d for d in docs if d is not None]
    if not docs:
        raise LaunchFileError(f"{name}: no documents")
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise LaunchFileError(f"{name}: document {i} is not a mapping")
        kind, api = doc.get("kind"), str(doc.get("apiVersion", ""))
        group, _, version = api.rpartition("/")
        if (group, kind, version) not in _crds():
            known = sorted(f"{g}/{v} {k}" for g, k, v in _crds())
            raise LaunchFileError(f"{name}: document {i}: no CRD for {api} {kind} in {CRDS} "
                                  f"(known: {', '.join(known)})")
        label = f"document {i} ({kind} {doc.get('metadata', {}).get('name', '?')})"
        _schema_errors(name, crd_validator(group, kind, version), doc,
                       f"{label}: the {kind} CRD ({version})")
        if kind == "RayService":  # its cluster is a RayCluster: the RayCluster CRD agrees
            cluster = {"apiVersion": api, "kind": "RayCluster",
                       "metadata": {"name": doc["metadata"]["name"]},
                       "spec": doc["spec"]["rayClusterConfig"]}
            _schema_errors(name, crd_validator(group, "RayCluster", version), cluster,
                           f"{label}: spec.rayClusterConfig as a RayCluster ({version})")
    return docs


# -- Serve configs and the project's own parser -----------------------------------------------

def check_app_args(where: str, args: dict):
    """The application's `args` through the project's parser: (the Serve application built,
    the placement-group bundles of its replicas)."""
    from deploy.config import split_args
    from deploy.server import build_app, deployment_options
    try:
        cfg = split_args(args)[0]  # every setting's type and range, the residual's syntax
        cfg.group_options()
        app = build_app(copy.deepcopy(args))  # what `serve deploy` runs on the cluster
    except (TypeError, ValueError) as e:
        raise LaunchFileError(f"{where}: args: {type(e).__name__}: {e}") from None
    return app, deployment_options(cfg)["placement_group_bundles"]


def check_serve_config(where: str, config, labels: dict[str, set]) -> list[str]:
    """A Serve config through Serve's schema and each application's args through the project's
    parser; `labels` ({key: values} the file's nodes carry; None: any) must cover every label
    selector. The application names."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise LaunchFileError(f"{where}: not a Serve config: {e}") from None
    for a in schema.applications:
        at = f"{where}: application {a.name!r}"
        if a.import_path != APP:
            raise LaunchFileError(f"{at}: import_path {a.import_path!r}, expected {APP!r}")
        app, bundles = check_app_args(at, a.args or {})
        name = app._bound_deployment.name
        for d in a.deployments:
            if d.name != name:
                raise LaunchFileError(f"{at}: deployments: no deployment {d.name!r} in the "
                                      f"app (it has {name!r})")
            override = d.model_dump(exclude_unset=True)
            if "placement_group_bundles" in override and \
                    override["placement_group_bundles"] != bundles:
                raise LaunchFileError(
                    f"{at}: deployments: placement_group_bundles "
                    f"{override['placement_group_bundles']} are not the app's own {bundles}")
            for selector in override.get("placement_group_bundle_label_selector") or []:
                for key, value in selector.items():
                    if key not in labels or (labels[key] is not None
                                             and value not in labels[key]):
                        raise LaunchFileError(
                            f"{at}: a bundle selects {key}={value} but no node of the file "
                            f"carries it (labels: {labels})")
    return [a.name for a in schema.applications]


def _labels(maps) -> dict[str, set | None]:
    """{key: values} of the node labels in `maps`, each checked by Ray's own label rules."""
    from ray._private.label_utils import validate_node_label_syntax, validate_node_labels

    labels: dict[str, set | None] = {}
    for m in maps:
        validate_node_label_syntax(m)
        validate_node_labels(m)
        for k, v in m.items():
            labels.setdefault(k, set()).add(v)
    return labels


def launcher_labels(config: dict) -> dict[str, set | None]:
    labels = _labels(t.get("labels") or {}
                     for t in (config.get("available_node_types") or {}).values())
    commands = config.get("head_start_ray_commands", []) + \
        config.get("worker_start_ray_commands", [])
    if any(f'--labels="{INTERCONNECT_LABEL}=$(' in c for c in commands):
        labels[INTERCONNECT_LABEL] = None  # detected by each node at start: any value
    return labels


def kuberay_labels(spec: dict) -> dict[str, set | None]:
    cluster = spec["rayClusterConfig"]
    return _labels(g.get("labels") or {}
                   for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])])


def _literal_tokens(node) -> list:
    """Environment entries that would carry Ray's token as a literal, and Secrets with data."""
    if isinstance(node, list):
        return [x for n in node for x in _literal_tokens(n)]
    if not isinstance(node, dict):
        return []
    own = [node] if (node.get("name") == "RAY_AUTH_TOKEN" and "value" in node) or \
        (node.get("kind") == "Secret" and (node.get("data") or node.get("stringData"))) else []
    return own + [x for v in node.values() for x in _literal_tokens(v)]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


# -- the files ------------------------------------------------------------------------------------

def test_there_are_launch_files():
    providers = {_load(p)["provider"]["type"] for p in LAUNCHERS}
    assert {"aws", "local"} <= providers, [p.name for p in LAUNCHERS]
    assert MANIFESTS, "no KubeRay manifest in cluster/kuberay/"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_passes_ray_validation(path):
    prepared = check_launcher(path.name, _load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_serve_config(path):
    config = _load(path)
    names = check_serve_config(f"{path.name}: metadata.serve_config",
                               config["metadata"]["serve_config"], launcher_labels(config))
    assert names


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_token_auth_and_labels(path):
    """Every `ray start` with token auth, the token from a file the launcher copies (never in
    the file), and the GPU nodes labelled with their interconnect."""
    config = check_launcher(path.name, _load(path))
    starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[k] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN" not in path.read_text()
    assert INTERCONNECT_LABEL in launcher_labels(config)
    for name, node_type in config["available_node_types"].items():
        if node_type["resources"].get("GPU"):
            assert INTERCONNECT_LABEL in (node_type.get("labels") or {}), name


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_head_deploys_its_serve_config(path, tmp_path):
    """The head's own commands, run here: the Serve config comes back out of the bootstrap
    config the launcher writes on the head (JSON), and is what `serve deploy` is given."""
    config = check_launcher(path.name, _load(path))
    (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(config))
    head = config["head_start_ray_commands"]
    extract = [c for c in head if "serve_config" in c and "serve deploy" not in c]
    deploy = [c for c in head if "serve deploy ~/serve_config.yaml" in c]
    assert len(extract) == 1 and len(deploy) == 1, head
    env = {**os.environ, "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", extract[0]], check=True, env=env, timeout=60)
    assert _load(tmp_path / "serve_config.yaml") == config["metadata"]["serve_config"]


@needs_shared
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_kuberay_crds(path):
    check_manifest(path.name, list(yaml.safe_load_all(path.read_text())))


@needs_shared
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_serve_config_token_and_labels(path):
    for doc in check_manifest(path.name, list(yaml.safe_load_all(path.read_text()))):
        if doc["kind"] != "RayService":
            continue
        spec = doc["spec"]
        check_serve_config(f"{path.name}: {doc['metadata']['name']} spec.serveConfigV2",
                           yaml.safe_load(spec["serveConfigV2"]), kuberay_labels(spec))
        auth = spec["rayClusterConfig"].get("authOptions", {})
        assert auth.get("mode") == "token" and auth.get("secretName"), auth
        assert _literal_tokens(doc) == []
        groups = spec["rayClusterConfig"]["workerGroupSpecs"]
        assert all(INTERCONNECT_LABEL in (g.get("labels") or {}) for g in groups)
        assert all(any("nvidia.com/gpu" in c["resources"]["limits"]
                       for c in g["template"]["spec"]["containers"]) for g in groups)


# -- the validators reject broken files ------------------------------------------------------------

def _launcher(name="aws-nvlink.yaml"):
    return name, _load(REPO / "cluster" / name)


def _reject(check, name, broken, *fragments):
    with pytest.raises(LaunchFileError) as e:
        check(name, broken)
    msg = str(e.value)
    assert msg.startswith(f"{name}: "), msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_launcher_wrong_type_rejected():
    name, c = _launcher()
    c["max_workers"] = "two"
    _reject(check_launcher, name, c, "at max_workers", "'two' is not of type 'integer'")


def test_launcher_missing_required_rejected():
    name, c = _launcher()
    del c["available_node_types"]["gpu-nvlink"]["resources"]
    _reject(check_launcher, name, c, "available_node_types.gpu-nvlink",
            "'resources' is a required property")
    name, c = _launcher("onprem.yaml")
    del c["provider"]
    _reject(check_launcher, name, c, "'provider' is a required property")


def test_launcher_unknown_field_rejected():
    name, c = _launcher()
    c["setup_comands"] = c.pop("setup_commands")
    _reject(check_launcher, name, c, "'setup_comands' was unexpected")


def test_launcher_refused_by_ray_up_rejected():
    """Past the schema: what `ray up`'s preparation refuses (more workers at minimum than the
    cluster's maximum)."""
    name, c = _launcher("aws-pcie.yaml")
    c["max_workers"] = 1
    _reject(check_launcher, name, c, "`ray up` would refuse it", "max_workers")


@needs_shared
def test_manifest_wrong_type_rejected():
    name = "rayservice.yaml"
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    _reject(check_manifest, name, docs, "spec.rayClusterConfig.workerGroupSpecs.0.replicas",
            "'one' is not of type 'integer'")
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    docs[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    _reject(check_manifest, name, docs, "rayStartParams.num-cpus", "0 is not of type 'string'")


@needs_shared
def test_manifest_missing_required_rejected():
    name = "rayservice.yaml"
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    del docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["groupName"]
    _reject(check_manifest, name, docs, "workerGroupSpecs.1",
            "'groupName' is a required property")
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    del docs[0]["metadata"]["name"]
    _reject(check_manifest, name, docs, "'name' is a required property")


@needs_shared
def test_manifest_unknown_field_and_kind_rejected():
    name = "rayservice.yaml"
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    group = docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    _reject(check_manifest, name, docs, "'rayStartParam' was unexpected")
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    docs[0]["apiVersion"] = "ray.io/v2"
    _reject(check_manifest, name, docs, "no CRD for ray.io/v2 RayService")


@needs_shared
def test_manifest_int_or_string():
    """Quantities are int-or-string: both forms pass; anything else, or a string that is not a
    quantity, does not."""
    name = "rayservice.yaml"
    path = REPO / "cluster" / "kuberay" / name

    def with_cpu(value):
        docs = list(yaml.safe_load_all(path.read_text()))
        group = docs[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = value
        return docs

    check_manifest(name, with_cpu(16))
    check_manifest(name, with_cpu("16"))
    check_manifest(name, with_cpu("500m"))
    at = "containers.0.resources.limits.cpu"
    _reject(check_manifest, name, with_cpu([16]), at, "is not valid under any of the given")
    _reject(check_manifest, name, with_cpu("sixteen"), at, "does not match")
    _reject(check_manifest, name, with_cpu(1.5), at, "is not valid under any of the given")


@needs_shared
def test_manifest_duplicate_list_map_keys_rejected():
    name = "rayservice.yaml"
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / name).read_text()))
    ports = docs[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["ports"]
    ports.append(dict(ports[0], name="again"))
    _reject(check_manifest, name, docs, "ports", "share")


def test_k8s_schema_extensions():
    """The Kubernetes extensions the KubeRay CRDs use, and those they may come to use."""
    v = k8s_validator({"type": "object", "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {"type": "object", "properties": {
            "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"n": {"type": "integer"}}},
            "closed": {"type": "object", "properties": {"n": {"type": "integer"}}},
            "port": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "tags": {"type": "array", "items": {"type": "string"},
                     "x-kubernetes-list-type": "set"},
            "pod": {"type": "object", "x-kubernetes-embedded-resource": True,
                    "properties": {"spec": {"type": "object"}}}}}}})

    def errors(spec):
        doc = {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"}, "spec": spec}
        return [e.message for e in v.iter_errors(doc)]

    assert errors({"open": {"n": 1, "anything": [1]}}) == []
    assert errors({"closed": {"n": 1, "anything": 1}})
    assert errors({"open": {"n": "1"}})  # known fields keep their types
    assert errors({"port": 8000}) == [] and errors({"port": "http"}) == []
    assert errors({"port": 1.5}) and errors({"port": [8000]})
    assert errors({"when": None}) == [] and errors({"when": "now"}) == []
    assert errors({"when": 3})
    assert errors({"tags": ["a", "b"]}) == [] and errors({"tags": ["a", "a"]})
    assert errors({"pod": {"apiVersion": "v1", "kind": "Pod", "spec": {}}}) == []
    assert errors({"pod": {"apiVersion": 1}})


def _serve(name="aws-pcie.yaml"):
    config = _load(REPO / "cluster" / name)
    return name, config["metadata"]["serve_config"], launcher_labels(config)


def test_serve_config_not_serve_rejected():
    name, serve, labels = _serve()
    serve["applications"][0]["import_path"] = 3
    _reject(lambda n, s: check_serve_config(n, s, labels), name, serve,
            "not a Serve config", "import_path")


def test_serve_args_rejected_by_the_project():
    """Settings the project's parser refuses: each would fail only on the cluster otherwise."""
    for change, fragment in [
            ({"tp_size": 2}, "unknown server settings ['tp_size']"),
            ({"tp": "2"}, "tp: '2' is not a"),
            ({"dtype": "fp8"}, "dtype 'fp8' is not one of"),
            ({"comm": "gloo"}, "does not run on device 'cuda'"),
            ({"strategy": "SPREAD_THIN"}, "strategy 'SPREAD_THIN' is not one of"),
            ({"residual": "ladder:9-3"}, "empty range"),
            ({"autoscaling_config": {"min_replicas": "one"}}, "min_replicas")]:
        name, serve, labels = _serve()
        serve["applications"][1]["args"].update(change)
        _reject(lambda n, s: check_serve_config(n, s, labels), name, serve,
                "application 'network': args", fragment)


@needs_shared
def test_serve_deployment_overrides_checked():
    name = "rayservice.yaml"
    doc = _load(REPO / "cluster" / "kuberay" / name)
    labels = kuberay_labels(doc["spec"])
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve["applications"][0]["deployments"][0]["name"] = "Ladder"
    _reject(lambda n, s: check_serve_config(n, s, labels), name, serve,
            "no deployment 'Ladder' in the app")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve["applications"][0]["args"]["tp"] = 4  # the override's bundles still say two ranks
    _reject(lambda n, s: check_serve_config(n, s, labels), name, serve,
            "placement_group_bundles", "are not the app's own")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    selector = serve["applications"][1]["deployments"][0]["placement_group_bundle_label_selector"]
    selector[0][INTERCONNECT_LABEL] = "infiniband"
    _reject(lambda n, s: check_serve_config(n, s, labels), name, serve,
            f"selects {INTERCONNECT_LABEL}=infiniband but no node")


@needs_shared
def test_literal_token_found():
    doc = _load(REPO / "cluster" / "kuberay" / "rayservice.yaml")
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [{"name": "RAY_AUTH_TOKEN", "value": "not-a-secret-any-more"}]
    assert _literal_tokens(doc) == [head["env"][0]]
    head["env"] = [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "ladder-ray-token", "key": "auth_token"}}}]
    assert _literal_tokens(doc) == []
