"""Offline checks of the real-cluster files in cluster/ (no network, no Ray cluster, a few seconds):
the launcher configs against Ray's own schema, `trainslot` on every worker node type, the same
torch/torchvision pins as constraints.txt, the KubeRay manifest's shape, and that the commands in
cluster/README.md name files, flags and config keys that exist."""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
LOCKED = ("torch", "torchvision")


def _module_constant(path: Path, name: str):
    """A top-level constant of a module, read without importing it (progan.training.train_loop loads torch)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path}: no {name}")


TRAIN_SLOT = _module_constant(REPO / "cluster" / "local.py", "TRAIN_SLOT")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
    return pins


PINS = _pins()


def _facenet_install() -> str:
    """The Makefile's `--no-deps facenet-pytorch==X` install."""
    found = re.findall(r"--no-deps\s+(facenet-pytorch==\S+)", (REPO / "Makefile").read_text())
    assert len(found) == 1, found
    return found[0]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _all_commands(config: dict) -> list[str]:
    commands = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        commands += config.get(key) or []
    for node_type in config["available_node_types"].values():
        commands += node_type.get("worker_setup_commands") or []
    return commands


def _check_locked_installs(text: str, where: str) -> None:
    """Every `torch==` / `torchvision==` in `text` names constraints.txt's version, both appear,
    and facenet-pytorch goes in with --no-deps at the Makefile's version."""
    for package in LOCKED:
        found = re.findall(rf"(?<![\w.-]){package}==([\w.+-]+)", text)
        assert found, f"{where}: does not install {package}"
        assert set(found) == {PINS[package]}, f"{where}: {package} {found} but constraints.txt pins {PINS[package]}"
    assert re.search(r"pip install[^\n]*--no-deps\s+" + re.escape(_facenet_install()), text), \
        f"{where}: no `pip install --no-deps {_facenet_install()}` as in the Makefile"


def _ray_image_tag_matches(image: str) -> bool:
    return bool(re.fullmatch(rf"rayproject/ray:{re.escape(PINS['ray'])}-py3\d+-gpu", image))


def test_the_pins_these_checks_rely_on():
    import ray

    assert PINS["ray"] == ray.__version__, "constraints.txt's ray is not the installed one"
    assert all(package in PINS for package in LOCKED)
    assert TRAIN_SLOT == "trainslot"


@pytest.mark.parametrize("name", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_passes_rays_own_validation(name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(name)
    assert raw["provider"]["type"] == LAUNCHER_CONFIGS[name]
    # the schema shipped in the installed ray, on the file as written (top-level typos included)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    # what `ray up` does before launching anything: merge the provider's defaults, then validate
    validate_config(prepare_config(copy.deepcopy(raw)))


@pytest.mark.parametrize("name", sorted(LAUNCHER_CONFIGS))
def test_launcher_worker_types_advertise_trainslot_and_a_gpu(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert TRAIN_SLOT not in head["resources"] and not head["resources"].get("GPU"), \
        "the head must not look like a training node"
    workers = {key: value for key, value in types.items() if key != config["head_node_type"]}
    assert workers
    for key, node_type in workers.items():
        resources = node_type["resources"]
        assert resources.get(TRAIN_SLOT) == 1, f"{name}: {key} does not advertise {TRAIN_SLOT}: 1"
        assert resources.get("GPU", 0) >= 1, f"{name}: {key} has no GPU"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        accelerators = node_type["node_config"].get("guestAccelerators")
        if accelerators is not None:  # GCP: the stated GPU count must be the attached one
            assert sum(a["acceleratorCount"] for a in accelerators) == resources["GPU"]
            assert node_type["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"


@pytest.mark.parametrize("name", sorted(LAUNCHER_CONFIGS))
def test_launcher_setup_installs_the_locked_versions(name):
    config = _load(name)
    commands = _all_commands(config)
    _check_locked_installs("\n".join(commands), name)
    # the lock files the commands install from are the repository's own, mounted from the root
    mounts = config["file_mounts"]
    installs = [c for c in commands if " -r " in c]
    assert len(installs) == 1, installs
    match = re.search(r"-r (\S+/requirements\.txt) -c (\S+/constraints\.txt)", installs[0])
    assert match, installs[0]
    for remote in match.groups():
        local = mounts.get(remote)
        assert local and (REPO / local).is_file() and Path(local).name == Path(remote).name, (remote, local)
    for command in commands:
        if re.search(r"(?<![\w.-])torch==", command):
            assert f"-c {match.group(2)}" in command
    assert _ray_image_tag_matches(config["docker"]["image"]), config["docker"]["image"]


@pytest.mark.parametrize("name", sorted(LAUNCHER_CONFIGS))
def test_launcher_shares_one_mount_with_the_container(name):
    config = _load(name)
    volumes = [o.split()[1] for o in config["docker"]["run_options"] if o.startswith("-v ")]
    assert "/mnt/shared:/mnt/shared" in volumes
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])


def test_dockerfile_installs_the_locked_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    _check_locked_installs(text, "cluster/Dockerfile")
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert _ray_image_tag_matches(base), base
    for lock in ("requirements.txt", "constraints.txt"):
        assert re.search(rf"^COPY\b.*\b{re.escape(lock)}\b", text, re.M)


def _kuberay() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay.yaml").read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0], docs


def _ray_resources(params: dict) -> dict:
    """rayStartParams.resources in KubeRay's format: a JSON object inside a quoted string."""
    text = params.get("resources")
    if text is None:
        return {}
    assert text.startswith('"') and text.endswith('"'), f"not KubeRay's quoted format: {text!r}"
    return json.loads(text[1:-1].replace('\\"', '"'))


def test_kuberay_manifest_is_a_raycluster_with_a_head_and_a_gpu_worker_group():
    cluster, docs = _kuberay()
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"])


def _check_ray_cluster_spec(spec: dict) -> None:
    """A RayCluster spec (also a RayJob's rayClusterSpec): a CPU head, GPU worker groups with one
    trainslot each, one image, Ray's version, limits equal to requests."""
    assert spec["rayVersion"] == PINS["ray"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    assert len(groups) >= 2
    images = set()
    for name, group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{name}: rayStartParams must be strings"
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        assert container["resources"]["limits"] == container["resources"]["requests"], name
    assert len(images) == 1, "one image for every group"
    head_container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    assert TRAIN_SLOT not in _ray_resources(spec["headGroupSpec"]["rayStartParams"])
    for group in spec["workerGroupSpecs"]:
        assert _ray_resources(group["rayStartParams"]) == {TRAIN_SLOT: 1}
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_pods_share_one_read_write_many_volume():
    cluster, docs = _kuberay()
    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    spec = cluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes}
        claim = mounts.get("/mnt/shared")
        assert claim in claims, "no shared claim at /mnt/shared"
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]


# --- cluster/rayjob.yaml: one run as a KubeRay RayJob, data and run on object storage ------------


def _rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "RayJob" and docs[0]["apiVersion"] == "ray.io/v1"
    return docs[0]


def _pods(spec: dict) -> list[dict]:
    return [group["template"]["spec"] for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def test_rayjob_runs_on_a_cluster_shaped_like_the_kuberay_one_that_it_removes_after():
    job = _rayjob()
    spec = job["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert {c["image"] for pod in _pods(spec["rayClusterSpec"]) for c in pod["containers"]} \
        == {c["image"] for pod in _pods(_kuberay()[0]["spec"]) for c in pod["containers"]}
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])  # the code travels with the job


def test_rayjob_entrypoint_is_launch_py_with_data_and_run_on_object_storage():
    from progan.model.config import load_config

    words = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["python", "launch.py"]
    args = words[2:]
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    assert flags <= _flags(REPO / "launch.py"), flags - _flags(REPO / "launch.py")
    assert args[args.index("--address") + 1] == "auto"
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    cfg = load_config(REPO / args[args.index("--config") + 1], overrides)  # raises on a bad key
    assert cfg.cluster.use_gpu is True
    assert args[args.index("--data") + 1].startswith("s3://")
    assert args[args.index("--storage") + 1].startswith("s3://")


def test_rayjob_pods_share_no_disk_and_get_credentials_from_a_secret_only():
    """Nothing assumes a shared disk (no volumes at all), every pod that touches the bucket gets
    the AWS variables from one Secret, and no credential value is written in the file."""
    pods = _pods(_rayjob()["spec"]["rayClusterSpec"])
    secrets = set()
    for pod in pods:
        assert not pod.get("volumes")
        for container in pod["containers"]:
            assert not container.get("volumeMounts")
            secrets |= {source["secretRef"]["name"] for source in container["envFrom"]}
            assert not [e for e in container.get("env", []) if e["name"].startswith("AWS_")]
    assert len(secrets) == 1
    assert not re.search(r"AWS_SECRET_ACCESS_KEY=(?!\.\.\.)", (CLUSTER / "rayjob.yaml").read_text())


# --- cluster/README.md: the commands name things that exist --------------------------------------

README = (CLUSTER / "README.md").read_text()
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:cluster|configs|progan|data_pipeline|monitoring|tests)/[\w./-]*\w"
                       r"|launch\.py|requirements\.txt|constraints\.txt|Makefile)(?![\w/])")


def _readme_commands() -> list[list[str]]:
    """Every command in the README's bash blocks (continuations joined, comments dropped), as
    argument lists, split at && and &."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words, current = shlex.split(line, comments=True), []
            for word in words + ["&&"]:
                if word in ("&&", "&", ";"):
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(word)
    assert commands
    return commands


def _flags(path: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", path.read_text()))


def test_readme_names_files_that_exist():
    named = set(REPO_PATH.findall(README))
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay.yaml", "cluster/Dockerfile"} <= named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"cluster/README.md names missing files: {missing}"


def test_readme_commands_use_real_files_flags_and_config_keys():
    from progan.model.config import load_config

    launch_flags, pipeline_flags = _flags(REPO / "launch.py"), _flags(REPO / "data_pipeline" / "__main__.py")
    seen = set()
    for words in _readme_commands():
        if words[:1] == ["ray"] and words[1] in ("up", "dashboard", "attach", "down", "rsync-up"):
            config = next(w for w in words[2:] if not w.startswith("-"))
            assert (REPO / config).is_file(), words
            seen.add("ray " + words[1])
        elif words[:2] == ["kubectl", "port-forward"]:
            # KubeRay names the head's Service after the RayCluster
            assert words[2] == f"service/{_kuberay()[0]['metadata']['name']}-head-svc", words
        elif words[:2] in (["kubectl", "apply"], ["kubectl", "delete"]) or words[:2] == ["docker", "build"]:
            assert (REPO / words[words.index("-f") + 1]).is_file(), words
            seen.add(" ".join(words[:2]))
        elif words[:3] == ["ray", "job", "submit"]:
            entry = words[words.index("--") + 1:]
            assert "--working-dir" in words
            if entry[:2] == ["python", "launch.py"]:
                args = entry[2:]
                flags = {a.split("=")[0] for a in args if a.startswith("--")}
                assert flags <= launch_flags, flags - launch_flags
                assert args[args.index("--address") + 1] == "auto"
                assert (REPO / args[args.index("--config") + 1]).is_file()
                overrides = [a for a in args if not a.startswith("-") and "=" in a]
                cfg = load_config(REPO / args[args.index("--config") + 1], overrides)  # raises on a bad key
                # data and runs on the shared mount every config gives every node
                assert args[args.index("--data") + 1].startswith("/mnt/shared/")
                assert cfg.checkpoint.run_root.startswith("/mnt/shared/")
                assert cfg.cluster.use_gpu is True
                seen.add("launch")
            elif entry[:3] == ["python", "-m", "data_pipeline"]:
                flags = {a for a in entry[3:] if a.startswith("--")}
                assert flags <= pipeline_flags, flags - pipeline_flags
                seen.add("pipeline")
    assert {"ray up", "ray dashboard", "ray attach", "ray down", "kubectl apply", "launch"} <= seen, seen
