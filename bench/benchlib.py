"""Shared helpers of the Colony benchmarks (python3, standard library only).

- the `colony` binary: $COLONY_BIN, else target/release/colony (built if missing);
- a JSON-over-HTTP client with short timeouts;
- clusters of real agents, on loopback (`LoopbackCluster`) or on test hosts in network
  namespaces on one bridge (`NetnsCluster`); both remove everything they made on exit,
  on Ctrl-C and on SIGTERM;
- percentiles and the machine description every benchmark prints with its figures.

Network namespaces need root, iproute2 and util-linux (nsenter). Everything a namespace
cluster creates is named `cb<pid % 1000>...` and lives in 10.77.<10..99>.0/24: the
integration tests use `cl...` and 10.77.100-249, so the two can run side by side.
"""

import atexit
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_PORT = 7474
P2P_LISTEN = "/ip4/0.0.0.0/tcp/7475"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def now_ms():
    """Wall-clock milliseconds since the epoch: the clock agents stamp runs with."""
    return time.time() * 1000.0


# ------------------------------------------------------------------------------------------
# The binary and the machine


def colony_binary():
    """$COLONY_BIN, or target/release/colony of this checkout (built when missing)."""
    path = os.environ.get("COLONY_BIN")
    if path:
        if not os.access(path, os.X_OK):
            sys.exit(f"COLONY_BIN={path} is not an executable")
        return path
    path = os.path.join(REPO, "target", "release", "colony")
    if not os.access(path, os.X_OK):
        log(f"building {path} (cargo build --release --bin colony)")
        subprocess.run(["cargo", "build", "--release", "--bin", "colony"], cwd=REPO, check=True)
    return path


def machine():
    """What the figures were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_mb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": cpu,
        "mem_mb": mem_mb,
        "loadavg_1m_at_start": round(load, 2) if load is not None else None,
    }


def machine_line(m):
    return f"{m['nproc']} cores ({m['cpu'] or 'unknown cpu'}), {m['mem_mb']} MB, Linux {m['kernel']}, load {m['loadavg_1m_at_start']}"


# ------------------------------------------------------------------------------------------
# Statistics


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(rank) - 1]


def summary(values):
    """p50, p99 and max (rounded to 0.1)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(max(values), 1),
        "min": round(min(values), 1),
    }


# ------------------------------------------------------------------------------------------
# HTTP


class Api:
    """A tiny JSON client of one agent's API, keeping its connection open."""

    def __init__(self, host, port, timeout=5.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = None

    def call(self, method, path, body=None):
        """(status, parsed JSON or None); raises OSError when the agent cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                response = self.conn.getresponse()
                raw = response.read()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                return response.status, parsed
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 1 or method == "POST":
                    raise OSError(f"{method} {self.host}:{self.port}{path} failed")
        raise OSError("unreachable")

    def get(self, path):
        """The JSON of a 2xx/503 answer, or None on any failure."""
        try:
            status, body = self.call("GET", path)
        except OSError:
            return None
        return body if status in (200, 503) else None

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def node_states(api):
    """{node id: state} as one agent reports it, or None."""
    nodes = api.get("/v1/nodes")
    if not isinstance(nodes, list):
        return None
    return {n.get("id"): n.get("state") for n in nodes}


# ------------------------------------------------------------------------------------------
# Commands and cleanup

_cleanups = []


def _run_cleanups():
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - cleanup must go on
            log(f"cleanup: {e}")


def _on_signal(signum, _frame):
    _run_cleanups()
    sys.exit(128 + signum)


atexit.register(_run_cleanups)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def on_exit(fn):
    """Runs `fn` at exit, on SIGINT and on SIGTERM (last registered first)."""
    _cleanups.append(fn)


def run(*args, check=True):
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, deadline_s, check, interval=0.02):
    """Polls `check` until it returns a true value (returned), or raises after the deadline."""
    start = time.monotonic()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() - start > deadline_s:
            raise TimeoutError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(interval)


class Agent:
    """One agent process; `argv` is run as is (with `nsenter` in front for namespaces)."""

    def __init__(self, name, argv, log_path, api):
        self.name, self.argv, self.log_path, self.api = name, argv, log_path, api
        self.proc = None
        self.node_id = None

    def start(self):
        log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "info")},
        )
        log_file.close()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def wait_up(self, deadline_s=30):
        def up():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.name} exited ({self.proc.returncode}); see {self.log_path}")
            health = self.api.get("/v1/health")
            return health.get("node_id") if isinstance(health, dict) else None

        self.node_id = wait_for(f"agent {self.name} to answer", deadline_s, up)
        return self.node_id

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


class Scratch:
    """A temporary directory removed at exit (kept when COLONY_BENCH_KEEP=1)."""

    def __init__(self, prefix):
        self.path = tempfile.mkdtemp(prefix=prefix)
        if os.environ.get("COLONY_BENCH_KEEP") == "1":
            log(f"keeping agent data and logs in {self.path}")
        else:
            on_exit(lambda: shutil.rmtree(self.path, ignore_errors=True))


# ------------------------------------------------------------------------------------------
# Loopback cluster


class LoopbackCluster:
    """`n` agents on 127.0.0.1, mDNS off, joined by --seed (every agent seeds the first)."""

    def __init__(self, n, cpu_millis=2000, memory_mb=4096, extra_args=()):
        self.binary = colony_binary()
        self.scratch = Scratch("colony-bench-lo-")
        self.agents = []
        ports = [(free_port(), free_port()) for _ in range(n)]
        seed = f"/ip4/127.0.0.1/tcp/{ports[0][1]}"
        for i, (api_port, p2p_port) in enumerate(ports):
            name = f"b{i}"
            argv = [
                self.binary, "agent", "--dev", "--no-mdns",
                "--data-dir", os.path.join(self.scratch.path, f"{name}-data"),
                "--api", f"127.0.0.1:{api_port}",
                "--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}",
                "--name", name,
                "--cpu", str(cpu_millis), "--memory", str(memory_mb),
                *extra_args,
            ]
            if i > 0:
                argv += ["--seed", seed]
            self.agents.append(Agent(name, argv, os.path.join(self.scratch.path, f"{name}.log"),
                                     Api("127.0.0.1", api_port)))
        on_exit(self.stop)

    def start(self):
        for a in self.agents:
            a.start()
        for a in self.agents:
            a.wait_up()

    def stop(self):
        for a in self.agents:
            a.kill()


# ------------------------------------------------------------------------------------------
# Network-namespace cluster


def require_root():
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root (network namespaces)")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            sys.exit(f"`{tool}` is missing (apt-get install -y iproute2 util-linux)")


def _remove_namespace(ns):
    for _ in range(200):
        pids = run("ip", "netns", "pids", ns, check=False).split()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.02)
    run("ip", "netns", "del", ns, check=False)


def remove_leftovers(tag):
    """Deletes namespaces and links named `<tag>...` (an earlier run that died hard)."""
    for line in run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(tag):
            _remove_namespace(name)
    for line in run("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(tag):
                run("ip", "link", "del", name, check=False)


class NetnsCluster:
    """`n` test hosts in namespaces on one bridge; agents with mDNS on and no --seed.

    Host i is namespace `<tag>h<i>` with eth0 = 10.77.S.(10+i); the bridge `<tag>br` has
    10.77.S.1 and the benchmark reaches each API at 10.77.S.(10+i):7474 through it.
    """

    def __init__(self, n, cpu_millis=2000, memory_mb=4096):
        require_root()
        self.binary = colony_binary()
        self.tag = tag = f"cb{os.getpid() % 1000:03d}"
        self.subnet = 10 + os.getpid() % 90
        self.bridge = f"{tag}br"
        self.scratch = Scratch("colony-bench-ns-")
        self.cpu_millis, self.memory_mb = cpu_millis, memory_mb
        self.hosts = []  # (ns, veth, ip)
        self.agents = []
        self.generation = 0
        remove_leftovers(tag)
        on_exit(self.destroy)
        run("ip", "link", "add", "name", self.bridge, "type", "bridge", "mcast_snooping", "0")
        run("ip", "addr", "add", f"10.77.{self.subnet}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for i in range(n):
            ns, veth, ip = f"{tag}h{i}", f"{tag}v{i}", f"10.77.{self.subnet}.{10 + i}"
            self.hosts.append((ns, veth, ip))
            run("ip", "netns", "add", ns)
            for conf in ("default", "all"):
                self.in_ns(i, "sh", "-c", f"echo 0 > /proc/sys/net/ipv6/conf/{conf}/accept_dad", check=False)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            run("ip", "link", "set", veth, "master", self.bridge)
            run("ip", "link", "set", veth, "up")
            self.in_ns(i, "ip", "link", "set", "lo", "up")
            self.in_ns(i, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            self.in_ns(i, "ip", "link", "set", "eth0", "up")
            self.in_ns(i, "ip", "route", "add", "224.0.0.0/4", "dev", "eth0")
        self.new_agents()

    def in_ns(self, i, *args, check=True):
        return run("nsenter", f"--net=/run/netns/{self.hosts[i][0]}", *args, check=check)

    def new_agents(self):
        """Fresh agents (new data dirs, so new identities) for every host; not started."""
        self.generation += 1
        self.agents = []
        for i, (ns, _veth, ip) in enumerate(self.hosts):
            name = f"h{i}"
            data = os.path.join(self.scratch.path, f"g{self.generation}-{name}-data")
            argv = [
                "nsenter", f"--net=/run/netns/{ns}", self.binary, "agent",
                "--data-dir", data, "--listen", P2P_LISTEN, "--api", f"{ip}:{API_PORT}",
                "--name", name, "--cpu", str(self.cpu_millis), "--memory", str(self.memory_mb),
            ]
            log_path = os.path.join(self.scratch.path, f"g{self.generation}-{name}.log")
            self.agents.append(Agent(name, argv, log_path, Api(ip, API_PORT, timeout=2.0)))
        return self.agents

    def start(self):
        for a in self.agents:
            a.start()
        for a in self.agents:
            a.wait_up()

    def stop_agents(self):
        """Kills every agent and every process left in the namespaces (orphaned tasks)."""
        for a in self.agents:
            a.kill()
            a.api.close()
        for ns, _veth, _ip in self.hosts:
            for pid in run("ip", "netns", "pids", ns, check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def destroy(self):
        self.stop_agents()
        for ns, veth, _ip in self.hosts:
            _remove_namespace(ns)
            run("ip", "link", "del", veth, check=False)
        run("ip", "link", "del", self.bridge, check=False)
        remove_leftovers(self.tag)

    def host_of(self, node_id):
        for i, a in enumerate(self.agents):
            if a.node_id == node_id:
                return i
        return None

    def all_see(self, observers, subjects, state):
        """Whether every observer reports every subject (host indices) in `state`."""
        for o in observers:
            states = node_states(self.agents[o].api)
            if states is None:
                return False
            for s in subjects:
                if states.get(self.agents[s].node_id) != state:
                    return False
        return True
