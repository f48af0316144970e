"""Build FRACTAL's image where no container registry is reachable (this project's CI and lab machines).

    python deploy/build_local_image.py            # as root; prints what it did and how long it took

`deploy/Dockerfile` starts FROM python:3.11-slim, which needs a registry. Here the base comes from
Debian packages instead, and pip inside a container cannot reach the package index, so:

1. podman, runc, debootstrap, docker-compose and friends are installed from Debian when missing;
2. the base image is a `debootstrap --variant=minbase` Debian with python3 (3.11, so cp311 wheels
   fit), imported with `podman import`; it is made once and reused (delete it to remake it);
3. the wheelhouse (the project's wheel and every runtime dependency's, the otel extra's included) is
   built on the host;
4. `podman build -f deploy/Dockerfile --build-arg BASE=...` installs it offline (the Dockerfile does
   when its wheelhouse folder holds wheels); podman's layer cache makes a rebuild with unchanged
   sources take seconds;
5. a Prometheus image is made from the base, Debian's prometheus binary and busybox (for `wget`,
   as in the upstream image's healthcheck), for the compose file's `prometheus` service.

crun cannot run containers on this machine kind (cgroup v1 in hybrid mode) and runc cannot set the
default rlimits, so every podman call gets CONTAINERS_CONF (`containers_conf()`): runc, lower
nofile/nproc limits and netavark. The system's /etc/containers is never edited.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE = "localhost/fractal-ml-server:local"
BASE = "localhost/fractal-base:bookworm"
PROMETHEUS = "localhost/fractal-prometheus:local"
# The Debian packages the build and the compose test use (CLI names differ: busybox-static is busybox).
PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "iptables", "debootstrap", "docker-compose",
            "prometheus", "busybox-static")
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
# What the Dockerfile COPYs from its build context; the context is a copy of just these, plus the
# wheelhouse folder (the Dockerfile's default WHEELHOUSE), made empty and filled by build_wheelhouse().
CONTEXT = ("pyproject.toml", "setup.cfg", "README.md", "broker", "worker", "frontend", "metrics", "fractal",
           "deploy/Dockerfile", "deploy/entrypoint.sh")
WHEELHOUSE = "deploy/wheelhouse"
EXTRAS = "otel"  # what the Dockerfile installs: fractal-ml-server[otel], so its wheels must be here
CONTAINERS_CONF = """\
# Written by deploy/build_local_image.py: what podman needs on this machine kind (see its docstring).
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"

[network]
network_backend = "netavark"
"""


class Unavailable(RuntimeError):
    """Containers cannot run on this machine (not root, or the packages cannot be installed)."""


@dataclass
class Built:
    image: str
    prometheus_image: str
    image_bytes: int
    base_seconds: float  # 0 when the cached base image was reused
    wheelhouse_seconds: float
    build_seconds: float


def run(argv: list[str], env: dict | None = None, timeout_s: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run argv; a failure raises with its output, which is what the caller needs to see."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {result.returncode}:\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return result


def missing_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    if shutil.which("dpkg-query") is None:
        raise Unavailable("not a Debian system: the build installs its tools with apt-get")
    status = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *packages],
                            capture_output=True, text=True)
    installed = {line.split()[0] for line in status.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def install_packages() -> None:
    """apt-get install what is missing; Unavailable when that cannot be done."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"Debian packages {missing} are missing and installing them needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"apt-get install {' '.join(missing)} failed: {exc}") from exc


def containers_conf(directory: Path) -> dict[str, str]:
    """Write the podman configuration into directory; the environment every podman call needs."""
    path = directory / "containers.conf"
    path.write_text(CONTAINERS_CONF)
    return dict(os.environ, CONTAINERS_CONF=str(path))


def debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses here (deb822 .sources first, then one-line lists), for debootstrap."""
    files = sorted((sources_dir / "sources.list.d").glob("*.sources")) + [sources_dir / "sources.list",
               *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "bookworm" in fields.get("Suites", "").split() and "-security" not in fields.get("URIs", ""):
                    return fields["URIs"].split()[0]
        else:
            match = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def image_exists(name: str, env: dict) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=env).returncode == 0


def image_id(name: str, env: dict) -> str:
    """The image's ID, or "" when there is none by that name."""
    result = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", name], env=env,
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def ensure_base(env: dict, name: str = BASE) -> float:
    """Make the base image unless it exists; the seconds it took (0 when cached)."""
    if image_exists(name, env):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fractal-rootfs-", dir="/var/tmp") as rootfs:
        run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", rootfs,
             debian_mirror()], timeout_s=1200)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/locale",
                     "usr/share/man", "usr/share/info"):  # what python:3.11-slim leaves out too
            for item in (Path(rootfs) / junk).glob("*"):
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        try:
            run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", name], env=env, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            tar.wait()
    return time.monotonic() - started


def wheelhouse_argv(source: Path, target: Path) -> list[str]:
    """The pip command that builds the wheelhouse: the project with its EXTRAS, and every dependency."""
    return [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(target), f"{source}[{EXTRAS}]"]


def build_wheelhouse(source: Path, target: Path) -> None:
    """The project's wheel and its runtime dependencies' (the EXTRAS' too), built by the host's pip (it
    reaches the index).

    A fixed SOURCE_DATE_EPOCH makes the project's wheel the same bytes for the same sources, so
    podman's layer cache holds and an unchanged tree is not reinstalled into a new image.
    """
    run(wheelhouse_argv(source, target), env=dict(os.environ, SOURCE_DATE_EPOCH="315532800"))


def make_context(target: Path) -> Path:
    """A build context holding only what the Dockerfile copies (no .git, no tests, no caches)."""
    for item in CONTEXT:
        source, dest = REPO / item, target / item
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, dest)
    (target / WHEELHOUSE).mkdir(parents=True)  # never the checkout's: only this build's wheels go in
    return target


def podman_build(env: dict, tag: str, context: Path, *args: str) -> None:
    """`podman build -t tag`, then remove the image the tag named before if it changed (no pile of
    untagged old builds: the build stage is tagged too for that, and to keep its layers cached)."""
    previous = image_id(tag, env)
    run(["podman", "build", "--layers", *args, "-t", tag, str(context)], env=env, timeout_s=1800)
    if previous and previous != image_id(tag, env):
        subprocess.run(["podman", "rmi", previous], env=env, capture_output=True)


def build_image(env: dict, image: str = IMAGE, base: str = BASE) -> tuple[float, float]:
    """Wheelhouse plus `podman build`; the seconds each took."""
    with tempfile.TemporaryDirectory(prefix="fractal-context-", dir="/var/tmp") as tmp:
        context = make_context(Path(tmp) / "context")
        started = time.monotonic()
        build_wheelhouse(context, context / WHEELHOUSE)
        wheels_s = time.monotonic() - started
        started = time.monotonic()
        args = ("-f", str(context / "deploy" / "Dockerfile"), "--build-arg", f"BASE={base}")
        podman_build(env, f"{image}-build-stage", context, *args, "--target", "build")
        podman_build(env, image, context, *args)
        return wheels_s, time.monotonic() - started


def build_prometheus(env: dict, image: str = PROMETHEUS, base: str = BASE) -> None:
    """Prometheus from Debian's binaries on the base image (its ENTRYPOINT and user as upstream's)."""
    with tempfile.TemporaryDirectory(prefix="fractal-prometheus-", dir="/var/tmp") as tmp:
        for tool in ("prometheus", "promtool", "busybox"):
            shutil.copy2(shutil.which(tool), Path(tmp) / tool)
        shutil.copy2(REPO / "deploy" / "prometheus.Dockerfile", Path(tmp) / "Dockerfile")
        podman_build(env, image, Path(tmp), "--build-arg", f"BASE={base}")


def image_bytes(name: str, env: dict) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", name], env=env).stdout.strip())


def build_all(conf_dir: Path, image: str = IMAGE, prometheus_image: str = PROMETHEUS) -> Built:
    """Everything the compose test needs; Unavailable when podman cannot be had here."""
    install_packages()
    env = containers_conf(conf_dir)
    base_s = ensure_base(env)
    wheels_s, build_s = build_image(env, image)
    build_prometheus(env, prometheus_image)
    return Built(image, prometheus_image, image_bytes(image, env), round(base_s, 1), round(wheels_s, 1),
                 round(build_s, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=IMAGE, help=f"tag of the FRACTAL image (default {IMAGE})")
    parser.add_argument("--prometheus-image", default=PROMETHEUS, help=f"default {PROMETHEUS}")
    parser.add_argument("--conf-dir", default=None, help="where to keep containers.conf "
                        "(default: a temporary folder; set CONTAINERS_CONF to it for your own podman calls)")
    args = parser.parse_args(argv)
    conf_dir = Path(args.conf_dir or tempfile.mkdtemp(prefix="fractal-podman-"))
    try:
        built = build_all(conf_dir, args.image, args.prometheus_image)
    except Unavailable as exc:
        print(f"build_local_image: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(dict(asdict(built), containers_conf=str(conf_dir / "containers.conf")), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
