"""nginx in front of a served command API, configured as in production.

The server block is ``deploy/nginx/command-api.conf.template``, the file docker-compose.yml
gives the nginx image, with its ``${KESSAI_PROXY_*}`` variables filled in; around it a minimal
main configuration of the bench's own (one worker process, files in a temporary directory, no
daemon). The binary is ``nginx`` from PATH, else ``/usr/sbin/nginx`` (Debian: ``apt-get install
nginx-light``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

from bench.reconciler import process_cpu
from bench.serving import ROOT, children_of

TEMPLATE = ROOT / "deploy" / "nginx" / "command-api.conf.template"
UNBOUNDED = 65_535
"""A proxy bound no run reaches (nginx takes at most 65,535): its cost alone, without its limit."""
_VARIABLE = re.compile(r"\$\{(KESSAI_PROXY_[A-Z_]+)\}")
_MAIN = """\
{user}worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    client_body_temp_path {home}/body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
    include {home}/command-api.conf;
}}
"""


class NginxMissing(RuntimeError):
    """No nginx binary to run."""


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    if found is None:
        raise NginxMissing(
            "nginx is not installed (not on PATH, not /usr/sbin/nginx): "
            "apt-get install nginx-light, or run without --proxy"
        )
    return found


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``${KESSAI_PROXY_*}`` replaced by its value (nginx's own
    ``$variables`` untouched, as the nginx image's envsubst leaves them)."""
    missing = sorted(set(_VARIABLE.findall(template)) - set(values))
    if missing:
        raise KeyError(f"no value for {', '.join(missing)}")
    return _VARIABLE.sub(lambda m: values[m.group(1)], template)


def proxy_values(
    listen_port: int, upstream_port: int, max_in_flight: int, refund_in_flight: int
) -> dict[str, str]:
    return {
        "KESSAI_PROXY_LISTEN": f"127.0.0.1:{listen_port}",
        "KESSAI_PROXY_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "KESSAI_PROXY_MAX_IN_FLIGHT": str(max_in_flight),
        "KESSAI_PROXY_REFUND_IN_FLIGHT": str(refund_in_flight),
    }


class Proxy:
    """A running nginx (master and worker), its URL and the CPU it used."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, home: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.home = home

    def pids(self) -> list[int]:
        return [self.process.pid, *children_of(self.process.pid)]

    def cpu(self) -> float:
        return sum(process_cpu(pid) or 0.0 for pid in self.pids())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # nginx answered (the API behind it is already up)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.home / "error.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"nginx did not come up: {log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def proxied(
    home: Path,
    *,
    listen_port: int,
    upstream_port: int,
    max_in_flight: int,
    refund_in_flight: int,
    cpus: str | None = None,
) -> Iterator[Proxy]:
    """nginx on ``listen_port`` in front of the API on ``upstream_port``, with the production
    server block; pinned to ``cpus`` (taskset -c) if given. Its files go to a new directory
    under ``home``."""
    binary = nginx_binary()
    directory = home / f"nginx-{listen_port}"
    directory.mkdir()
    values = proxy_values(listen_port, upstream_port, max_in_flight, refund_in_flight)
    (directory / "command-api.conf").write_text(render(TEMPLATE.read_text(), values))
    # Run as root, nginx hands its workers to "nobody", who could not write the temp files.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(_MAIN.format(user=user, home=directory))
    argv = [binary, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    checked = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, check=False)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx refused the configuration: {checked.stderr.strip()}")
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    with (directory / "stderr.log").open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    proxy = Proxy(process, listen_port, directory)
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()
