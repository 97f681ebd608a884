"""`make images-smoke`: the images as the cluster runs them, on a tiny random bundle, with a real container engine.

Builds the images (`make images`; unchanged layers come from the engine's cache), exports random:tiny with the export
image as the export Job runs it, then runs the tail image as the Deployment runs its pod: the user, read-only root,
dropped capabilities, no-new-privileges, volume mounts and the ConfigMap's environment all read from k8s/ (a mount
that Kubernetes would provide from a PVC is the exported directory here; the pod network is a namespace of its own,
which the client container joins). Two things differ, because this machine has neither: the provider list is
["CPUExecutionProvider"] (no GPU), and the token is a fresh random one (the Secret holds a placeholder).

Checks: the init container's command; the probe paths; the image HEALTHCHECK (its own command, and Docker's verdict);
a generation over HTTP from the client image equal byte for byte to `--local`; a wrong token refused with 401; on
SIGTERM the readiness path answers 503 while the service drains, then it exits 0 within the pod's
terminationGracePeriodSeconds (`docker stop -t` that grace); the ConfigMap's own providers without a GPU: exit 2.
Where no engine can run it prints one line saying why and exits 0.

    python scripts/images/smoke.py     (settings as for scripts/images/build.py; SMOKE_BUILD=0 uses built images)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import IMAGES, build_all, tag  # noqa: E402
from engine import Engine, NoEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PROMPT = "hello"
MAX_NEW_TOKENS = "8"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
PROBE = """import sys, urllib.error, urllib.request
def status(url):
    try:
        return urllib.request.urlopen(url, timeout=3).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0
if sys.argv[2] == "once":
    print(status(sys.argv[1]))
else:  # until the service stops answering
    while True:
        code = status(sys.argv[1])
        print(code, flush=True)
        if code == 0:
            break
        __import__("time").sleep(0.2)
"""


class Failed(Exception):
    pass


def check(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise Failed(f"{what}{': ' + detail if detail else ''}")
    print(f"images-smoke: ok: {what}", flush=True)


def objects() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def is_log_record(line: str) -> bool:
    try:
        return "level" in json.loads(line)
    except (ValueError, TypeError):
        return False


def quantity(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value)).groups()
    return int(number) * UNITS.get(unit, 1)


def hardening(pod: dict, container: dict) -> list[str]:
    """docker run flags for the pod's and the container's securityContext (the container's wins)."""
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    flags = ["--user", f"{context['runAsUser']}:{context['runAsGroup']}"]
    if context.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    for capability in context.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", capability]
    if context.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    return flags


def mounts(pod: dict, container: dict, claim_dir: Path, empty_dir: Path) -> list[str]:
    """docker run flags for the container's volumeMounts: a PVC is claim_dir, an emptyDir a tmpfs of its sizeLimit
    (/dev/shm: the shm size), an optional Secret that does not exist here an empty read-only directory."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    flags = []
    for mount in container["volumeMounts"]:
        volume, path = volumes[mount["name"]], mount["mountPath"]
        readonly = ",readonly" if mount.get("readOnly") else ""
        if "persistentVolumeClaim" in volume:
            flags += ["--mount", f"type=bind,src={claim_dir},dst={path}{readonly}"]
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            if path == "/dev/shm":
                flags += ["--shm-size", str(quantity(size or "64Mi"))]
            else:
                flags += ["--mount", f"type=tmpfs,dst={path}" + (f",tmpfs-size={quantity(size)}" if size else "")]
        elif volume.get("secret", {}).get("optional"):
            flags += ["--mount", f"type=bind,src={empty_dir},dst={path},readonly"]
        else:
            raise Failed(f"volume {mount['name']} of {container['name']}: no stand-in for {sorted(volume)}")
    return flags


class Smoke:
    def __init__(self, docker: str, work: Path) -> None:
        self.docker, self.work = docker, work
        self.names = {image.name: tag(image) for image in IMAGES}
        found = objects()
        self.config = found[("ConfigMap", "split-tail-config")]["data"]
        self.pod = found[("Deployment", "split-tail")]["spec"]["template"]["spec"]
        self.tail = next(c for c in self.pod["containers"] if c["name"] == "tail")
        self.job_pod = found[("Job", "split-export")]["spec"]["template"]["spec"]
        self.port = self.tail["ports"][0]["containerPort"]
        self.grace = self.pod["terminationGracePeriodSeconds"]
        self.token = secrets.token_hex(32)
        self.container = f"splitllm-smoke-{os.getpid()}-tail"
        self.bundles = work / "bundles"
        self.empty = work / "empty"

    def docker_run(self, args: list[str], timeout: float = 600, check_rc: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.docker, *args], capture_output=True, timeout=timeout)
        if check_rc and result.returncode != 0:
            raise Failed(f"docker {' '.join(a for a in args[:12] if len(a) < 200)}… exited {result.returncode}:\n"
                         f"{result.stderr.decode(errors='replace')[-3000:]}")
        return result

    def url(self, probe: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.tail[probe]['httpGet']['path']}"

    def probe(self, probe: str) -> int:
        """The HTTP status of a probe path from inside the pod (0: no answer, or the container is not running)."""
        out = self.docker_run(["exec", self.container, "python", "-c", PROBE, self.url(probe), "once"], 30,
                              check_rc=False)
        return int(out.stdout.strip() or 0)

    def state(self) -> dict:
        out = self.docker_run(["inspect", "--format", "{{json .State}}", self.container])
        return json.loads(out.stdout)

    def logs(self) -> str:
        out = self.docker_run(["logs", self.container], check_rc=False)
        return (out.stdout + out.stderr).decode(errors="replace")

    def run(self) -> None:
        self.export()
        self.init_container()
        self.start_tail()
        self.health()
        self.client()
        self.drain()
        self.without_gpu()

    def export(self) -> None:
        """The Job's pod, with the model, split and dtype of a tiny test bundle instead of the ConfigMap's."""
        self.bundles.mkdir()
        self.empty.mkdir()
        container = self.job_pod["containers"][0]
        uid, gid = (self.job_pod["securityContext"][k] for k in ("runAsUser", "runAsGroup"))
        if os.geteuid() == 0:  # as the Job's fsGroup would
            os.chown(self.bundles, uid, gid)
        else:
            self.bundles.chmod(0o777)
        out = container["args"][container["args"].index("--out") + 1]
        started = time.monotonic()
        self.docker_run(["run", "--rm", "--network", "none", *hardening(self.job_pod, container),
                         *mounts(self.job_pod, container, self.bundles, self.empty),
                         self.names["export"], "--model", "random:tiny", "--split-layer", "2", "--out", out])
        check((self.bundles / "client").is_dir() and (self.bundles / "server").is_dir(),
              f"export image wrote client/ and server/ in {time.monotonic() - started:.0f} s")

    def config_env(self, **overrides: str) -> Path:
        """The ConfigMap as an env file (envFrom), plus overrides."""
        path = self.work / f"env-{len(list(self.work.glob('env-*')))}"
        path.write_text("".join(f"{k}={v}\n" for k, v in {**self.config, **overrides}.items()))
        return path

    def init_container(self) -> None:
        init = self.pod["initContainers"][0]
        command = init["command"]
        result = self.docker_run(["run", "--rm", "--network", "none", *hardening(self.pod, init),
                                  *mounts(self.pod, init, self.bundles, self.empty),
                                  "--env-file", str(self.config_env()), "--entrypoint", command[0],
                                  self.names["tail"], *command[1:]], timeout=120, check_rc=False)
        check(result.returncode == 0, f"init container {' '.join(command)} exits 0",
              result.stderr.decode(errors="replace"))

    def start_tail(self) -> None:
        env = self.config_env(SPLIT_SERVER_PROVIDERS='["CPUExecutionProvider"]', SPLIT_SERVER_TOKEN=self.token)
        # Docker's first health check comes one interval after the start: 2 s here instead of the image's 30 s.
        self.docker_run(["run", "-d", "--name", self.container, "--network", "none", "--health-interval", "2s",
                         *hardening(self.pod, self.tail), *mounts(self.pod, self.tail, self.bundles, self.empty),
                         "--env-file", str(env), self.names["tail"]])
        startup = self.tail["startupProbe"]
        deadline = time.monotonic() + startup["periodSeconds"] * startup["failureThreshold"]
        started = time.monotonic()
        while self.probe("readinessProbe") != 200:
            if not self.state()["Running"]:
                raise Failed(f"the tail container exited {self.state()['ExitCode']}:\n{self.logs()[-3000:]}")
            if time.monotonic() > deadline:
                raise Failed(f"the tail was not ready within its startupProbe budget:\n{self.logs()[-3000:]}")
            time.sleep(0.5)
        check(True, f"tail ready in {time.monotonic() - started:.1f} s as "
              f"{' '.join(hardening(self.pod, self.tail))}")

    def health(self) -> None:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            code = self.probe(probe)
            check(code == 200, f"{probe} {self.tail[probe]['httpGet']['path']} answers {code}")
        test = self.docker_run(["image", "inspect", "--format", "{{join .Config.Healthcheck.Test \" \"}}",
                                self.names["tail"]]).stdout.decode().split()
        assert test[0] == "CMD", test
        result = self.docker_run(["exec", self.container, *test[1:]], 30, check_rc=False)
        check(result.returncode == 0, f"HEALTHCHECK {' '.join(test[1:])} exits 0", result.stderr.decode())
        deadline = time.monotonic() + 30
        while (status := self.state().get("Health", {}).get("Status")) != "healthy" and time.monotonic() < deadline:
            time.sleep(1)
        check(status == "healthy", f"Docker reports the container {status}")

    def client_run(self, *args: str, token: str, network: str) -> subprocess.CompletedProcess:
        env = {"SPLIT_CLIENT_BUNDLE": "/bundles", "SPLIT_CLIENT_SERVER_URL": f"http://127.0.0.1:{self.port}",
               "SPLIT_CLIENT_TOKEN": token, "SPLIT_CLIENT_MAX_NEW_TOKENS": MAX_NEW_TOKENS}
        return self.docker_run(
            ["run", "--rm", "--network", network, "--read-only", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges", "--mount", "type=tmpfs,dst=/tmp",
             "--mount", f"type=bind,src={self.bundles},dst=/bundles,readonly",
             *[f"--env={k}={v}" for k, v in env.items()], self.names["client"], *args], 300, check_rc=False)

    def client(self) -> None:
        remote = self.client_run(PROMPT, token=self.token, network=f"container:{self.container}")
        check(remote.returncode == 0 and bool(remote.stdout.strip()), "client image generates over HTTP",
              remote.stderr.decode(errors="replace"))
        local = self.client_run("--local", PROMPT, token="", network="none")
        check(local.returncode == 0, "client image --local runs", local.stderr.decode(errors="replace"))
        check(remote.stdout == local.stdout, f"remote output equals --local byte for byte ({len(local.stdout)} bytes)",
              f"remote {remote.stdout!r}\nlocal  {local.stdout!r}")
        wrong = self.client_run(PROMPT, token="wrong-" + self.token[:8], network=f"container:{self.container}")
        said = (wrong.stdout + wrong.stderr).decode(errors="replace")
        check(wrong.returncode != 0 and "401" in said, "a wrong token is refused with 401", said[-2000:])

    def drain(self) -> None:
        ready = self.tail["readinessProbe"]["httpGet"]["path"]
        poller = subprocess.Popen([self.docker, "exec", self.container, "python", "-c", PROBE,
                                   self.url("readinessProbe"), "loop"], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1)
            started = time.monotonic()
            self.docker_run(["stop", "-t", str(self.grace), self.container], self.grace + 30)
            took = time.monotonic() - started
            statuses = [int(line) for line in poller.communicate(timeout=30)[0].split()]
        finally:
            poller.kill()
        state = self.state()
        check(503 in statuses, f"{ready} answers 503 while draining ({statuses.count(503)} polls of 0.2 s)",
              f"statuses {statuses}")
        check(state["ExitCode"] == 0 and took < self.grace,
              f"SIGTERM: exit {state['ExitCode']} after {took:.1f} s (docker stop -t {self.grace}, the pod's grace)",
              self.logs()[-3000:])

    def without_gpu(self) -> None:
        """The ConfigMap's providers (CUDA) in a container without a GPU: exit 2 with one error line (the service's
        own log records, JSON per the ConfigMap, may come before it; a traceback or onnxruntime's noise may not)."""
        result = self.docker_run(["run", "--rm", "--network", "none", *hardening(self.pod, self.tail),
                                  *mounts(self.pod, self.tail, self.bundles, self.empty),
                                  "--env-file", str(self.config_env()), self.names["tail"]], 120, check_rc=False)
        lines = [line for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
        other = [line for line in lines if not is_log_record(line)]
        check(result.returncode == 2 and len(other) == 1 and "CUDAExecutionProvider" in other[0],
              f"without a GPU the ConfigMap's providers exit 2 with one line ({len(lines) - len(other)} log records "
              f"before it): {other[0][:160] if other else ''}…",
              f"exit {result.returncode}, {len(other)} lines besides log records:\n" + "\n".join(lines))

    def close(self) -> None:
        subprocess.run([self.docker, "rm", "-f", self.container], capture_output=True)


def main() -> int:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="splitllm-smoke."))
    try:
        with Engine() as docker:
            if os.environ.get("SMOKE_BUILD", "1") != "0":
                build_all(docker)
            smoke = Smoke(docker, work)
            try:
                smoke.run()
            finally:
                smoke.close()
    except NoEngine as e:
        print(f"images-smoke: skipped: no container engine can run here: {e}")
        return 0
    except Failed as e:
        print(f"images-smoke: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"images-smoke: passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
