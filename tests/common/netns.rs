//! Test hosts in Linux network namespaces, each running a real `colony agent`.
//!
//! A [`Cluster`] is one bridge in the root namespace (`10.77.S.1/24`) and one namespace per
//! host, joined to the bridge by a veth pair (`eth0` inside, address `10.77.S.(10+i)`). The
//! agents run inside their namespaces (`nsenter --net`, which does not remount /sys) with mDNS
//! on, listening on `/ip4/0.0.0.0/tcp/7475`; their APIs listen on the namespace address and
//! the test reaches them through the bridge.
//!
//! Everything a cluster creates is named `<tag>...`, where the tag `cl<pid % 1000><test>` is
//! unique to one test of one run, and the cluster's `Drop` removes all of it, also when the
//! test panics: agents and every process left in the namespaces (tasks orphaned by a
//! `kill -9`) are killed, then the namespaces, veths and the bridge are deleted. Cuts are
//! iptables rules inside the namespaces, so they vanish with them. Leftovers of an earlier
//! run with the same tag are removed before a cluster is built.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The binary under test.
pub const COLONY: &str = env!("CARGO_BIN_EXE_colony");
/// Every wait is bounded by this: generous, so a loaded two-core machine does not fail a test.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often conditions are checked.
const POLL: Duration = Duration::from_millis(100);
const API_PORT: u16 = 7474;
const P2P_LISTEN: &str = "/ip4/0.0.0.0/tcp/7475";

/// Namespace tests run one at a time: five agents per test already load two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the namespace-test lock (a test that panicked while holding it does not block the rest).
pub fn serialize() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------
// Can this machine run namespace tests?

/// `true` when the test may run. Otherwise it prints why and returns `false` (the test then
/// returns: skipped), or panics when `COLONY_REQUIRE_ROOT_TESTS=1` (CI), so that a machine
/// that cannot run these tests does not pass them silently.
pub fn can_run(test: &str, test_no: u8, need_iptables: bool) -> bool {
    let Some(reason) = missing_capability(test_no, need_iptables) else {
        return true;
    };
    if std::env::var("COLONY_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1") {
        panic!("{test}: needs root and ip netns, but {reason} (COLONY_REQUIRE_ROOT_TESTS=1 forbids skipping)");
    }
    eprintln!("skipping {test}: needs root and ip netns: {reason}");
    false
}

fn missing_capability(test_no: u8, need_iptables: bool) -> Option<String> {
    if !is_root() {
        return Some("not running as root".into());
    }
    let mut tools = vec![("ip", "-V"), ("nsenter", "--version")];
    if need_iptables {
        tools.push(("iptables", "--version"));
    }
    for (tool, flag) in tools {
        if let Err(e) = run(tool, &[flag]) {
            return Some(format!("`{tool}` does not run ({e}); install iproute2, util-linux and iptables"));
        }
    }
    // Root in a container may still lack the right to make namespaces: try one.
    let probe = format!("{}p", tag(test_no));
    let _ = run("ip", &["netns", "del", &probe]);
    if let Err(e) = run("ip", &["netns", "add", &probe]) {
        return Some(format!("cannot create a network namespace: {e}"));
    }
    let result = if need_iptables {
        in_ns(&probe, "iptables", &["-w", "-L", "INPUT", "-n"])
            .err()
            .map(|e| format!("iptables does not work inside a namespace: {e}"))
    } else {
        None
    };
    let _ = run("ip", &["netns", "del", &probe]);
    result
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:` in /proc/self/status.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(2).map(|uid| uid == "0"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Commands

/// Runs a command to completion; its stderr is the error.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let output =
        Command::new(cmd).args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(cmd: &str, args: &[&str]) -> String {
    run(cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// Runs a command in a namespace's network stack only (`nsenter --net`).
fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> Result<String, String> {
    let net = format!("--net={}", netns_path(ns));
    let mut all = vec![net.as_str(), cmd];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

fn must_in_ns(ns: &str, cmd: &str, args: &[&str]) -> String {
    in_ns(ns, cmd, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends a signal (`"KILL"`, `"STOP"`, `"CONT"`) to one process.
pub fn signal(pid: u32, sig: &str) {
    let _ = run("kill", &["-s", sig, &pid.to_string()]);
}

/// The unique prefix of every name one test creates.
fn tag(test_no: u8) -> String {
    format!("cl{:03}{}", std::process::id() % 1000, test_no)
}

/// Kills every process in a namespace and deletes it (the veth inside goes with it).
fn remove_namespace(ns: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<String> =
            run("ip", &["netns", "pids", ns]).unwrap_or_default().split_whitespace().map(str::to_string).collect();
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in &pids {
            let _ = run("kill", &["-s", "KILL", pid]);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = run("ip", &["netns", "del", ns]);
}

/// Removes namespaces and links named `<tag>...` left by an earlier run with the same tag.
fn remove_leftovers(tag: &str) {
    for line in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(tag)) {
            remove_namespace(name);
        }
    }
    for line in run("ip", &["-o", "link", "show"]).unwrap_or_default().lines() {
        // `7: cl1231v0@if2: <...>`
        let name = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string());
        if let Some(name) = name.filter(|n| n.starts_with(tag)) {
            let _ = run("ip", &["link", "del", &name]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Task processes, found through /proc

/// A process whose command line is exactly `sleep <arg>`: a task a test started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskProcess {
    /// Its pid.
    pub pid: u32,
    /// The inode of its network namespace (tells which test host runs it).
    pub netns: Option<u64>,
}

/// Every live `sleep <arg>` process on the machine.
pub fn sleep_processes(arg: &str) -> Vec<TaskProcess> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let parts: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|p| !p.is_empty()).collect();
        let is_sleep = parts.len() == 2 && parts[0].rsplit(|b| *b == b'/').next() == Some(b"sleep".as_slice());
        if !is_sleep || parts[1] != arg.as_bytes() {
            continue;
        }
        // Zombies have an empty command line, so this is a live process.
        let netns = fs::read_link(entry.path().join("ns/net")).ok().and_then(|link| {
            let text = link.to_string_lossy().into_owned();
            text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
        });
        found.push(TaskProcess { pid, netns });
    }
    found
}

// ---------------------------------------------------------------------------------------
// The cluster

/// One test host: a namespace, its veth, and (when started) its agent.
pub struct Host {
    /// The agent's `--name`: `h<i>`.
    pub name: String,
    /// The namespace's name.
    pub ns: String,
    veth: String,
    /// The host's address on the bridge.
    pub ip: Ipv4Addr,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The agent's node id (from `/v1/health`), once started.
    pub node_id: String,
}

impl Host {
    /// The agent's pid (`nsenter` execs the agent, so the child is the agent).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the agent runs")
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A bridge with test hosts on it. Dropping it removes everything it made.
pub struct Cluster {
    tag: String,
    bridge: String,
    /// The hosts, in order.
    pub hosts: Vec<Host>,
    scratch: tempfile::TempDir,
    http: ureq::Agent,
}

impl Cluster {
    /// Builds `n` hosts on a fresh bridge. `test_no` (1..=9) makes the names and the subnet
    /// unique to the test.
    pub fn new(test_no: u8, n: usize) -> Cluster {
        assert!((1..=9).contains(&test_no) && n <= 50);
        let tag = tag(test_no);
        remove_leftovers(&tag);
        let subnet = 100 + (std::process::id() % 30) as u8 * 5 + (test_no % 5);
        let mut cluster = Cluster {
            bridge: format!("{tag}br"),
            tag,
            hosts: Vec::new(),
            scratch: tempfile::Builder::new().prefix("colony-netns-").tempdir().expect("a scratch dir"),
            http: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .build(),
        };
        // From here on a panic drops `cluster`, which removes what was made so far.
        let bridge = cluster.bridge.clone();
        must("ip", &["link", "add", "name", &bridge, "type", "bridge", "mcast_snooping", "0"]);
        must("ip", &["addr", "add", &format!("10.77.{subnet}.1/24"), "dev", &bridge]);
        must("ip", &["link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("{}h{i}", cluster.tag);
            let veth = format!("{}v{i}", cluster.tag);
            let ip = Ipv4Addr::new(10, 77, subnet, 10 + i as u8);
            cluster.hosts.push(Host {
                name: format!("h{i}"),
                ns: ns.clone(),
                veth: veth.clone(),
                ip,
                data_dir: cluster.scratch.path().join(format!("h{i}-data")),
                log: cluster.scratch.path().join(format!("h{i}.log")),
                child: None,
                node_id: String::new(),
            });
            must("ip", &["netns", "add", &ns]);
            // No IPv6 duplicate address detection delays: set before the links come up.
            for conf in ["default", "all"] {
                let _ = in_ns(&ns, "sh", &["-c", &format!("echo 0 > /proc/sys/net/ipv6/conf/{conf}/accept_dad")]);
            }
            must("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            must("ip", &["link", "set", &veth, "master", &bridge]);
            must("ip", &["link", "set", &veth, "up"]);
            must_in_ns(&ns, "ip", &["link", "set", "lo", "up"]);
            must_in_ns(&ns, "ip", &["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            must_in_ns(&ns, "ip", &["link", "set", "eth0", "up"]);
            // mDNS crosses the bridge only with a multicast route.
            must_in_ns(&ns, "ip", &["route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        cluster
    }

    /// Starts every agent and waits until each API answers.
    pub fn start_all(&mut self) {
        for i in 0..self.hosts.len() {
            self.spawn(i);
        }
        for i in 0..self.hosts.len() {
            self.wait_started(i);
        }
    }

    fn spawn(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        assert!(host.child.is_none(), "{} already runs", host.name);
        let log = fs::OpenOptions::new().create(true).append(true).open(&host.log).expect("open the agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&host.ns)))
            .arg(COLONY)
            .args(["agent", "--data-dir"])
            .arg(&host.data_dir)
            .args(["--listen", P2P_LISTEN, "--api", &format!("{}:{API_PORT}", host.ip), "--name", &host.name])
            .args(["--cpu", "4000", "--memory", "4096"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn nsenter colony agent");
        host.child = Some(child);
    }

    fn wait_started(&mut self, i: usize) {
        let start = Instant::now();
        loop {
            let host = &mut self.hosts[i];
            if let Some(Ok(Some(status))) = host.child.as_mut().map(Child::try_wait) {
                host.child = None;
                panic!("agent {} exited during start-up ({status}):\n{}", host.name, host.log_tail(40));
            }
            if let Some(health) = self.get(i, "/v1/health") {
                if let Some(id) = health["node_id"].as_str() {
                    self.hosts[i].node_id = id.to_string();
                    return;
                }
            }
            let host = &self.hosts[i];
            assert!(start.elapsed() < DEADLINE, "agent {} did not answer in time:\n{}", host.name, host.log_tail(40));
            std::thread::sleep(POLL);
        }
    }

    /// `kill -9` of one agent. Its tasks live on as orphans in its namespace (as after a
    /// real crash); `Drop` kills them.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.hosts[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}:{API_PORT}{path}", self.hosts[i].ip)
    }

    /// `GET` on host `i`'s API: the JSON body of a 2xx or 503 answer (health says "not ok"
    /// with 503), `None` when the agent cannot be reached.
    pub fn get(&self, i: usize, path: &str) -> Option<Value> {
        match self.http.get(&self.url(i, path)).call() {
            Ok(response) => response.into_json().ok(),
            Err(ureq::Error::Status(503, response)) => response.into_json().ok(),
            Err(_) => None,
        }
    }

    /// Submits a job to host `i`; panics unless it is acknowledged (201 with an id).
    pub fn submit(&self, i: usize, spec: &Value) -> String {
        let url = self.url(i, "/v1/jobs");
        match self.http.post(&url).send_json(spec) {
            Ok(response) => {
                let status = response.status();
                let body: Value = response.into_json().expect("JSON reply to a submission");
                assert_eq!(status, 201, "submission to {} answered {status}: {body}", self.hosts[i].name);
                body["id"].as_str().expect("an id").to_string()
            }
            Err(ureq::Error::Status(status, response)) => {
                panic!(
                    "submission to {} refused ({status}): {}",
                    self.hosts[i].name,
                    response.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("submission to {} failed: {e}", self.hosts[i].name),
        }
    }

    /// Host `i`'s view of the job, if it holds it.
    pub fn job(&self, i: usize, id: &str) -> Option<Value> {
        self.get(i, &format!("/v1/jobs/{id}"))
    }

    /// Host `i`'s view of the nodes: node id → state.
    pub fn node_states(&self, i: usize) -> Option<BTreeMap<String, String>> {
        let nodes = self.get(i, "/v1/nodes")?;
        Some(
            nodes
                .as_array()?
                .iter()
                .filter_map(|n| Some((n["id"].as_str()?.to_string(), n["state"].as_str()?.to_string())))
                .collect(),
        )
    }

    /// Whether every observer reports every subject in `state`.
    pub fn all_see(&self, observers: &[usize], subjects: &[usize], state: &str) -> bool {
        observers.iter().all(|&o| {
            self.node_states(o).is_some_and(|states| {
                subjects.iter().all(|&s| states.get(&self.hosts[s].node_id).map(String::as_str) == Some(state))
            })
        })
    }

    /// The table digest host `i` reports.
    pub fn digest(&self, i: usize) -> Option<String> {
        Some(self.get(i, "/v1/health")?["digest"].as_str()?.to_string())
    }

    /// Whether every host in `hosts` reports the same digest.
    pub fn same_digest(&self, hosts: &[usize]) -> bool {
        let digests: Vec<Option<String>> = hosts.iter().map(|&i| self.digest(i)).collect();
        digests.iter().all(|d| d.is_some() && *d == digests[0])
    }

    /// The host whose agent has node id `id`.
    pub fn host_of(&self, id: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.node_id == id)
    }

    /// The host whose namespace has inode `netns`.
    pub fn host_of_netns(&self, netns: u64) -> Option<usize> {
        self.hosts.iter().position(|h| fs::metadata(netns_path(&h.ns)).is_ok_and(|m| m.ino() == netns))
    }

    /// Cuts every host off from the hosts outside its own group: iptables rules inside each
    /// namespace drop packets to and from the other groups' addresses, both ways. Traffic
    /// with the bridge address (the test reaching the APIs) still flows. Established
    /// connections are not reset, as with a real cut.
    pub fn partition(&self, groups: &[&[usize]]) {
        for group in groups {
            for &i in *group {
                for (j, other) in self.hosts.iter().enumerate() {
                    if group.contains(&j) {
                        continue;
                    }
                    let ip = other.ip.to_string();
                    must_in_ns(&self.hosts[i].ns, "iptables", &["-w", "-A", "INPUT", "-s", &ip, "-j", "DROP"]);
                    must_in_ns(&self.hosts[i].ns, "iptables", &["-w", "-A", "OUTPUT", "-d", &ip, "-j", "DROP"]);
                }
            }
        }
    }

    /// Cuts host `i` off from every other host.
    pub fn isolate(&self, i: usize) {
        let rest: Vec<usize> = (0..self.hosts.len()).filter(|&j| j != i).collect();
        self.partition(&[&[i], &rest]);
    }

    /// Removes every cut.
    pub fn heal(&self) {
        for host in &self.hosts {
            must_in_ns(&host.ns, "iptables", &["-w", "-F", "INPUT"]);
            must_in_ns(&host.ns, "iptables", &["-w", "-F", "OUTPUT"]);
        }
    }

    /// What every host sees, for failure messages: node states and, for `job`, the instances.
    pub fn describe(&self, job: Option<&str>) -> String {
        let mut out = String::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let states: Vec<String> = self.node_states(i).map_or_else(
                || vec!["(unreachable)".to_string()],
                |states| {
                    states
                        .iter()
                        .map(|(id, state)| {
                            let name = self.host_of(id).map_or_else(|| id.clone(), |h| self.hosts[h].name.clone());
                            format!("{name}={state}")
                        })
                        .collect()
                },
            );
            out.push_str(&format!("{} ({}) sees nodes [{}]", host.name, host.ip, states.join(" ")));
            if let Some(id) = job {
                let summary = self.job(i, id).map_or_else(
                    || "(none)".to_string(),
                    |j| {
                        let instances: Vec<String> = j["instances"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .map(|inst| {
                                        format!(
                                            "#{} {} on {}",
                                            inst["index"],
                                            inst["status"].as_str().unwrap_or("?"),
                                            inst["node"].as_str().unwrap_or("-")
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        format!("{} [{}]", j["status"].as_str().unwrap_or("?"), instances.join(", "))
                    },
                );
                out.push_str(&format!("; job {id}: {summary}"));
            }
            out.push('\n');
        }
        out
    }

    /// Waits until `check` holds, or panics after [`DEADLINE`] with `what` and the cluster's view.
    pub fn wait_until(&self, what: &str, job: Option<&str>, mut check: impl FnMut(&Cluster) -> bool) {
        let start = Instant::now();
        while !check(self) {
            if start.elapsed() > DEADLINE {
                panic!("timed out after {DEADLINE:?} waiting for {what}; the cluster sees:\n{}", self.describe(job));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for host in &mut self.hosts {
            if let Some(mut child) = host.child.take() {
                // SIGKILL also ends a stopped process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if failed {
            for host in &self.hosts {
                eprintln!("---- last lines of agent {} ({}) ----\n{}", host.name, host.ip, host.log_tail(30));
            }
        }
        for host in &self.hosts {
            remove_namespace(&host.ns);
            let _ = run("ip", &["link", "del", &host.veth]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
        remove_leftovers(&self.tag);
    }
}

/// A service job: `sleep <arg>`, `count` instances.
pub fn sleep_service(name: &str, arg: &str, count: u32) -> Value {
    json!({
        "name": name,
        "command": "sleep",
        "args": [arg],
        "count": count,
        "resources": { "cpu_millis": 100, "memory_mb": 0 },
        "kind": "service",
    })
}

/// A batch job of one instance.
pub fn batch(name: &str, command: &str, args: &[&str]) -> Value {
    json!({
        "name": name,
        "command": command,
        "args": args,
        "count": 1,
        "resources": { "cpu_millis": 100, "memory_mb": 0 },
        "kind": "batch",
    })
}

/// The instances of a job view.
pub fn instances(job: &Value) -> Vec<Value> {
    job["instances"].as_array().cloned().unwrap_or_default()
}

/// The owner (node id) of each instance that is `running`, or `None` if any is not.
pub fn running_owners(job: &Value) -> Option<Vec<String>> {
    let instances = instances(job);
    if instances.is_empty() {
        return None;
    }
    instances
        .iter()
        .map(|inst| if inst["status"] == "running" { inst["node_id"].as_str().map(str::to_string) } else { None })
        .collect()
}
