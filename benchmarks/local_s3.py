"""A local S3 server (moto) in a child process, for the store benchmarks and the tests of stores on
object storage: this process's AWS variables point at it while it runs, each request can wait an
added latency, and s3fs's cached clients are closed before they are dropped."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


REQUESTS_PATH = "/_dhkd/requests"  # where the local S3 server answers its request counts (local_s3_requests)


def local_s3_available() -> bool:
    """Whether the local S3 server can run here: moto (its server) and s3fs (the store's client)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("moto", "s3fs"))


@contextlib.contextmanager
def local_s3_server(bucket: str = "dhkd-bench", latency_ms: float = 0.0):
    """A moto S3 server on 127.0.0.1 in a child process for the length of the block, with
    ``bucket`` created and this process's AWS_* variables pointing at it (dummy credentials);
    yields (``s3://bucket``, a function giving the server's CPU seconds so far, or None where
    they cannot be read). ``latency_ms``: added to every request before the server handles it
    (each request has its own server thread, so waits overlap as a network's do). The server counts
    the requests it answers by kind (``local_s3_requests``). The child
    exits when its stdin closes, so it never outlives us."""
    from dhkd_pipe.errors import DhkdError

    if not local_s3_available():
        raise DhkdError("--s3-local needs moto and s3fs: pip install 'moto[server]' s3fs")
    import s3fs

    code = (
        "import collections, json, logging, sys, threading, time\n"
        "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
        "from moto.moto_server.werkzeug_app import DomainDispatcherApplication\n"
        "latency = float(sys.argv[1]) / 1000\n"
        "counts, lock = collections.Counter(), threading.Lock()\n"
        "handle = DomainDispatcherApplication.__call__\n"
        "def counted(self, environ, start_response):\n"
        f"    if environ.get('PATH_INFO') == {REQUESTS_PATH!r}:\n"
        "        with lock:\n"
        "            body = json.dumps(counts).encode()\n"
        "        start_response('200 OK', [('Content-Type', 'application/json')])\n"
        "        return [body]\n"
        "    method, path = environ.get('REQUEST_METHOD', ''), environ.get('PATH_INFO', '').strip('/')\n"
        "    listing = method == 'GET' and '/' not in path and 'list-type' in environ.get('QUERY_STRING', '')\n"
        "    with lock:\n"
        "        counts['LIST' if listing else method] += 1\n"
        "    if latency > 0:\n"
        "        time.sleep(latency)\n"
        "    return handle(self, environ, start_response)\n"
        "DomainDispatcherApplication.__call__ = counted\n"
        "from moto.server import ThreadedMotoServer\n"
        "server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "server.start()\n"
        "print(server.get_host_and_port()[1], flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(float(latency_ms))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    try:
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise DhkdError("the local S3 server (moto) did not start")
        os.environ.update(
            {
                "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            os.environ.pop(k, None)
        _forget_s3_instances()  # one made for another endpoint (--url s3://..., the previous server) is not reused
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
        yield f"s3://{bucket}", (lambda: _cpu_seconds(proc.pid)) if _cpu_seconds(proc.pid) is not None else None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_s3_instances()
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def local_s3_requests() -> dict[str, int]:
    """{kind: count} of the requests the running ``local_s3_server`` has answered so far: ``LIST``
    (a bucket listing, one page each), else the HTTP method (GET, PUT, HEAD, DELETE, POST)."""
    import json
    import urllib.request

    with urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL_S3"] + REQUESTS_PATH, timeout=10) as response:
        return json.loads(response.read())


def _forget_s3_instances():
    """Closes the sessions of the cached s3fs instances, then drops them (dropped open, each would
    print "Unclosed client session" when collected)."""
    import s3fs
    from zarr.core.sync import sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        if getattr(fs, "_s3", None) is not None:
            try:
                if fs.loop is None:  # an asynchronous instance, Zarr's: its session lives on Zarr's loop
                    sync(fs._s3.__aexit__(None, None, None))
                else:
                    fs.close_session(fs.loop, fs._s3)
            except Exception:  # tidying only: a session that will not close must not cost the figures
                pass
    s3fs.S3FileSystem.clear_instance_cache()


_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
)
