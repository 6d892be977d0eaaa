//! End-to-end tests of the `colony` binary: real agents (`colony agent --dev`) on loopback,
//! driven through the CLI and the HTTP API.
//!
//! Every agent is a child process owned by an [`Agent`] guard that stops it (SIGTERM, then
//! SIGKILL after a deadline) when dropped, also when a test panics. Every wait is for a
//! condition, with a deadline.

use serde_json::Value;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const COLONY: &str = env!("CARGO_BIN_EXE_colony");
/// Debug builds on a loaded two-core machine start slowly; this bounds every wait.
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

/// Waits until `check` returns `Some`, or panics after `deadline` naming `what`.
fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(POLL);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("local addr").port()
}

/// One `colony agent --dev` child process.
struct Agent {
    name: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    api_port: u16,
    extra_args: Vec<String>,
    token: Option<String>,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent and waits until its API answers `/v1/health`.
    fn start(name: &str, scratch: &Path, extra_args: &[&str], token: Option<&str>) -> Agent {
        let mut agent = Agent {
            name: name.to_string(),
            data_dir: scratch.join(format!("{name}-data")),
            log_path: scratch.join(format!("{name}.log")),
            api_port: free_port(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            token: token.map(str::to_string),
            child: None,
        };
        agent.spawn();
        agent
    }

    fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("open the agent log");
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--dev".into(),
            "--api".into(),
            format!("127.0.0.1:{}", self.api_port),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--name".into(),
            self.name.clone(),
        ];
        args.extend(self.extra_args.iter().cloned());
        let child = Command::new(COLONY)
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn colony agent");
        self.child = Some(child);
        self.wait_healthy();
    }

    fn wait_healthy(&mut self) {
        let url = format!("{}/v1/health", self.api());
        let token = self.token.clone();
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!("agent {} exited during start-up ({status}):\n{}", self.name, self.log_tail());
                }
            }
            if let Ok((200, _)) = http_try("GET", &url, None, token.as_deref()) {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "agent {} not healthy in time:\n{}", self.name, self.log_tail());
            std::thread::sleep(POLL);
        }
    }

    /// `kill -9`: no graceful anything.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same data dir, name and API port.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running agent");
        self.spawn();
    }

    /// SIGTERM, and waits for the process to end.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().expect("a running agent").id();
        let sent = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
        assert!(sent.success());
        self.wait_exit()
    }

    /// Waits for the process to end by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("a running agent");
        let status = wait_for(&format!("agent {} to exit", self.name), DEADLINE, || child.try_wait().ok().flatten());
        self.child = None;
        status
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The CLI pointed at this agent.
    fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.api(), args, &[])
    }

    fn get(&self, path: &str) -> (u16, Value) {
        http("GET", &format!("{}{path}", self.api()), None, self.token.as_deref())
    }

    /// A peer-to-peer address other agents can `--seed` with.
    fn listen_addr(&self) -> String {
        let (status, health) = self.get("/v1/health");
        assert_eq!(status, 200, "{health}");
        health["listen_addrs"][0].as_str().expect("the health reply lists listen addresses").to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        if std::thread::panicking() {
            eprintln!("--- log of agent {} ---\n{}", self.name, self.log_tail());
        }
        // Graceful first, so the agent stops its tasks; SIGKILL if it takes too long.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills a CLI child process when dropped (a no-op once it has exited and been reaped).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the CLI against `api` with a deadline; kills it if it hangs.
fn run_cli(api: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(COLONY);
    command.args(args).env("COLONY_API", api).env_remove("COLONY_TOKEN_FILE").env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn the colony CLI");
    // Read the pipes on threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`colony {}` did not finish within {DEADLINE:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        stdout_of(&output),
        stderr_of(&output)
    );
    stdout_of(&output)
}

/// An HTTP request; a transport failure is an `Err`.
fn http_try(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> Result<(u16, Value), String> {
    let mut request = ureq::request(method, url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => request.set("Content-Type", "application/json").send_string(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => return Err(error.to_string()),
    };
    let status = response.status();
    let text = response.into_string().map_err(|e| e.to_string())?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, value))
}

fn http(method: &str, url: &str, body: Option<&str>, token: Option<&str>) -> (u16, Value) {
    http_try(method, url, body, token).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// The job id `colony job run` printed: one line, nothing else.
fn job_id(stdout: &str) -> String {
    let id = stdout.trim();
    assert!(!id.is_empty() && !id.contains(char::is_whitespace), "expected a job id alone on stdout, got {stdout:?}");
    id.to_string()
}

fn job_json(agent: &Agent, id: &str) -> Value {
    let output = ok(agent.cli(&["job", "status", id, "--json"]));
    serde_json::from_str(&output).expect("job status --json prints JSON")
}

/// Waits until `agent` sees job `id` in a terminal state, and returns it.
fn wait_terminal(agent: &Agent, id: &str) -> Value {
    wait_for(&format!("job {id} to end on {}", agent.name), DEADLINE, || {
        let (status, job) = agent.get(&format!("/v1/jobs/{id}"));
        (status == 200 && ["succeeded", "failed", "stopped"].contains(&job["status"].as_str().unwrap_or("")))
            .then_some(job)
    })
}

/// Sends a body larger than the API's limit on a raw socket, writing and reading at once
/// (the agent answers before reading it all), and returns the status line.
fn post_oversized(api_port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", api_port)).expect("connect to the API");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    let mut body = b"{\"command\":\"".to_vec();
    body.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    body.extend(b"\"}");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().expect("clone the socket");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let _ = writer.write_all(&body);
    });
    let mut reply = [0u8; 256];
    let n = stream.read(&mut reply).expect("read the reply");
    drop(stream);
    let _ = sender.join();
    String::from_utf8_lossy(&reply[..n]).lines().next().unwrap_or("").to_string()
}

#[test]
fn one_agent_runs_jobs_and_explains_errors() {
    let scratch = TempDir::new().expect("temp dir");
    let mut agent = Agent::start("solo", scratch.path(), &[], None);

    // Submit, print the id, wait, read status and logs.
    let id = job_id(&ok(agent.cli(&["job", "run", "--", "echo", "hi"])));
    let waited = agent.cli(&["job", "run", "--wait", "--", "echo", "hi"]);
    let waited_id = job_id(&ok(waited));
    for id in [&id, &waited_id] {
        wait_terminal(&agent, id);
        let job = job_json(&agent, id);
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["instances"][0]["status"], "succeeded", "{job}");
        assert_eq!(job["instances"][0]["exit_code"], 0, "{job}");
        let logs = ok(agent.cli(&["job", "logs", id]));
        assert_eq!(logs, "hi\n");
    }
    let human = ok(agent.cli(&["job", "status", &id]));
    assert!(human.contains("succeeded") && human.contains("solo") && human.contains("attempt"), "{human}");
    let list = ok(agent.cli(&["job", "list"]));
    assert!(list.starts_with("ID") && list.contains(&id) && list.contains(&waited_id), "{list}");
    let list: Value = serde_json::from_str(&ok(agent.cli(&["job", "list", "--json"]))).expect("JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    // A failing command: --wait says so, and the status keeps the exit code.
    let failed = agent.cli(&["job", "run", "--wait", "--", "sh", "-c", "exit 3"]);
    assert_eq!(failed.status.code(), Some(1), "stderr: {}", stderr_of(&failed));
    let failed_id = job_id(&stdout_of(&failed));
    let job = job_json(&agent, &failed_id);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["instances"][0]["exit_code"], 3, "{job}");

    // The documented example file runs as it is.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/job.toml");
    let example_id = job_id(&ok(agent.cli(&["job", "run", "-f", example, "--wait"])));
    let logs = ok(agent.cli(&["job", "logs", &example_id, "--index", "1"]));
    assert!(logs.contains("hello from") && logs.contains("world"), "{logs}");

    // --follow prints output as it comes and ends with the job.
    let slow = job_id(&ok(agent.cli(&["job", "run", "--", "sh", "-c", "echo one; sleep 1; echo two"])));
    let followed = ok(agent.cli(&["job", "logs", &slow, "--follow"]));
    assert_eq!(followed, "one\ntwo\n");

    // Stopping a job ends a --wait with a failure.
    let mut waiter = ChildGuard(
        Command::new(COLONY)
            .args(["job", "run", "--wait", "--", "sleep", "600"])
            .env("COLONY_API", agent.api())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn job run --wait"),
    );
    let mut line = String::new();
    {
        let stdout = waiter.0.stdout.as_mut().expect("stdout");
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
    }
    let sleeper = job_id(&line);
    wait_for("the sleeper to run", DEADLINE, || {
        (job_json(&agent, &sleeper)["instances"][0]["status"] == "running").then_some(())
    });
    ok(agent.cli(&["job", "stop", &sleeper]));
    let status = wait_for("job run --wait to end", DEADLINE, || waiter.0.try_wait().ok().flatten());
    assert_eq!(status.code(), Some(1));
    assert_eq!(wait_terminal(&agent, &sleeper)["status"], "stopped");

    // Bad specs are refused, naming the field.
    let url = format!("{}/v1/jobs", agent.api());
    let (status, body) = http("POST", &url, Some(r#"{"command":"echo","count":0}"#), None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "count", "{body}");
    assert!(body["error"].as_str().unwrap_or("").contains("count"), "{body}");
    let (status, body) = http("POST", &url, Some(r#"{"comand":"echo"}"#), None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "comand", "{body}");
    let (status, body) = http("POST", &url, Some(r#"{"command":"echo","resources":{"memory_mb":"lots"}}"#), None);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "resources.memory_mb", "{body}");
    let (status, body) = http("POST", &url, Some("{not json"), None);
    assert_eq!(status, 400, "{body}");
    let refused = agent.cli(&["job", "run", "--count", "0", "--", "echo"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr_of(&refused).contains("error: invalid job spec: field `count`"), "{}", stderr_of(&refused));
    assert!(refused.stdout.is_empty());

    // Unknown ids and routes: 404 with a JSON error.
    let (status, body) = agent.get("/v1/jobs/no-such-job");
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let (status, _) = agent.get("/v1/jobs/no-such-job/logs?index=0");
    assert_eq!(status, 404);
    let (status, _) = http("DELETE", &format!("{}/v1/jobs/no-such-job", agent.api()), None, None);
    assert_eq!(status, 404);
    let missing = agent.cli(&["job", "status", "no-such-job"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr_of(&missing).starts_with("error: "), "{}", stderr_of(&missing));

    // Oversized bodies: 413.
    let status_line = post_oversized(agent.api_port);
    assert!(status_line.contains(" 413 "), "{status_line}");

    // Metrics, nodes, drain.
    let metrics = ureq::get(&format!("{}/metrics", agent.api())).call().expect("metrics").into_string().expect("text");
    assert!(metrics.contains("colony_jobs"), "{metrics}");
    let nodes = ok(agent.cli(&["node", "list"]));
    assert!(nodes.starts_with("NAME") && nodes.contains("solo"), "{nodes}");
    ok(agent.cli(&["node", "drain"]));
    let nodes: Value = serde_json::from_str(&ok(agent.cli(&["node", "list", "--json"]))).expect("JSON");
    assert_eq!(nodes[0]["mode"], "draining", "{nodes}");
    ok(agent.cli(&["node", "undrain"]));

    // kill -9 and restart on the same data dir: every acknowledged job is still there.
    let acknowledged = job_id(&ok(agent.cli(&["job", "run", "--", "echo", "durable"])));
    agent.kill9();
    agent.restart();
    for id in [&id, &waited_id, &failed_id, &acknowledged] {
        let (status, job) = agent.get(&format!("/v1/jobs/{id}"));
        assert_eq!(status, 200, "job {id} lost across kill -9: {job}");
    }
    assert_eq!(wait_terminal(&agent, &acknowledged)["status"], "succeeded");

    // An agent that is not there: exit code 2 and a hint.
    let nobody = run_cli(&format!("http://127.0.0.1:{}", free_port()), &["job", "list"], &[]);
    assert_eq!(nobody.status.code(), Some(2));
    assert!(stderr_of(&nobody).contains("cannot reach the agent"), "{}", stderr_of(&nobody));

    // Leave: the agent answers, then shuts down cleanly.
    ok(agent.cli(&["node", "leave"]));
    assert!(agent.wait_exit().success());
}

#[test]
fn a_configured_token_is_required() {
    let scratch = TempDir::new().expect("temp dir");
    let token_file = scratch.path().join("token");
    fs::write(&token_file, "correct-horse-battery-staple\n").expect("write the token");
    let token_path = token_file.display().to_string();

    // A cluster key: written owner-only, never overwritten, accepted by the agent.
    let key_path = scratch.path().join("cluster.key");
    let key = key_path.display().to_string();
    let fingerprint = ok(run_cli("http://unused", &["keygen", "--out", &key], &[]));
    assert!(!fingerprint.trim().is_empty() && !fingerprint.trim().contains(' '), "{fingerprint:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key_path).expect("key file").permissions());
    assert_eq!(mode & 0o777, 0o600);
    let again = run_cli("http://unused", &["keygen", "--out", &key], &[]);
    assert_eq!(again.status.code(), Some(1), "keygen overwrote a key");

    let mut agent = Agent::start(
        "guarded",
        scratch.path(),
        &["--api-token-file", &token_path, "--cluster-key", &key],
        Some("correct-horse-battery-staple"),
    );
    let api = agent.api();

    for path in ["/v1/jobs", "/v1/nodes", "/v1/health", "/metrics", "/v1/jobs/x"] {
        let (status, body) = http("GET", &format!("{api}{path}"), None, None);
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = http("GET", &format!("{api}{path}"), None, Some("wrong"));
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = http("POST", &format!("{api}/v1/jobs"), Some(r#"{"command":"echo"}"#), None);
    assert_eq!(status, 401);
    let (status, _) = http("POST", &format!("{api}/v1/node/leave"), None, None);
    assert_eq!(status, 401);
    let (status, _) = http("GET", &format!("{api}/v1/jobs"), None, Some("correct-horse-battery-staple"));
    assert_eq!(status, 200);

    let refused = run_cli(&api, &["job", "list"], &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr_of(&refused).contains("token"), "{}", stderr_of(&refused));
    let id =
        job_id(&ok(run_cli(&api, &["job", "run", "--token-file", &token_path, "--wait", "--", "echo", "hi"], &[])));
    let logs = ok(run_cli(&api, &["job", "logs", &id], &[("COLONY_TOKEN_FILE", &token_path)]));
    assert_eq!(logs, "hi\n");

    // SIGTERM: a graceful exit.
    assert!(agent.terminate().success(), "{}", agent.log_tail());
    assert!(agent.log_tail().contains("node stopped"), "{}", agent.log_tail());
}

#[test]
fn every_command_has_help() {
    for args in [&["--help"][..], &["agent", "--help"], &["job", "run", "--help"], &["node", "list", "--help"]] {
        let help = ok(run_cli("http://unused", args, &[]));
        assert!(help.contains("Usage: colony"), "{help}");
    }
    let usage = run_cli("http://unused", &["job", "frobnicate"], &[]);
    assert_eq!(usage.status.code(), Some(2));
}

/// Whether `agent` sees three nodes, all alive.
fn all_alive(agent: &Agent) -> Option<()> {
    let (status, nodes) = agent.get("/v1/nodes");
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    (status == 200 && nodes.len() == 3 && nodes.iter().all(|n| n["state"] == "alive")).then_some(())
}

/// Alpha, and bravo and charlie seeded to it, once each sees all three alive.
fn three_agents(scratch: &Path) -> [Agent; 3] {
    let a = Agent::start("alpha", scratch, &[], None);
    let seed = a.listen_addr();
    let b = Agent::start("bravo", scratch, &["--seed", &seed], None);
    let c = Agent::start("charlie", scratch, &["--seed", &seed], None);
    let agents = [a, b, c];
    for agent in &agents {
        wait_for(&format!("{} to see three live nodes", agent.name), DEADLINE, || all_alive(agent));
    }
    agents
}

#[test]
fn three_agents_share_jobs_and_keep_them_across_kill_9() {
    let scratch = TempDir::new().expect("temp dir");
    let mut agents = three_agents(scratch.path());

    // Submitted on A, run somewhere, visible everywhere.
    let id = job_id(&ok(agents[0].cli(&["job", "run", "--count", "3", "--wait", "--", "sh", "-c", "echo ran-here"])));
    let mut runners = Vec::new();
    for agent in &agents {
        let job = wait_terminal(agent, &id);
        assert_eq!(job["status"], "succeeded", "on {}: {job}", agent.name);
        let list = ok(agent.cli(&["job", "list"]));
        assert!(list.contains(&id), "{} does not list {id}: {list}", agent.name);
        runners = job["instances"].as_array().expect("instances").iter().map(|i| i["node"].clone()).collect();
    }
    // Logs of instance 0, fetched from an agent that did not run it.
    let runner = runners[0].as_str().expect("instance 0 has a node").to_string();
    let other = agents.iter().find(|x| x.name != runner).expect("an agent that did not run instance 0");
    let (status, logs) = other.get(&format!("/v1/jobs/{id}/logs?index=0"));
    let job = other.get(&format!("/v1/jobs/{id}")).1;
    assert_eq!(status, 200, "{logs}");
    assert_eq!(
        logs["stdout"], "ran-here\n",
        "logs of instance 0 (ran on {runner}) read through {}: {logs}\njob: {job}",
        other.name
    );
    assert_eq!(ok(other.cli(&["job", "logs", &id, "--index", "0"])), "ran-here\n");

    // kill -9 of B right after it acknowledged a job; B restarted keeps it, and it runs.
    let acknowledged = job_id(&ok(agents[1].cli(&["job", "run", "--", "echo", "after-restart"])));
    agents[1].kill9();
    agents[1].restart();
    let (status, job) = agents[1].get(&format!("/v1/jobs/{acknowledged}"));
    assert_eq!(status, 200, "bravo lost an acknowledged job across kill -9: {job}");
    for agent in &agents {
        wait_for(&format!("{} to see bravo back", agent.name), DEADLINE, || all_alive(agent));
        assert_eq!(wait_terminal(agent, &acknowledged)["status"], "succeeded");
    }
    let (status, job) = agents[1].get(&format!("/v1/jobs/{id}"));
    assert_eq!(status, 200, "{job}");
}

/// An agent restarted alone on the data dir of a bigger cluster (its peers are gone, their
/// instances were running, some jobs finished) takes the work over and runs new jobs: the
/// stale peers are certified dead and their running instances run again here.
#[test]
fn an_agent_restarted_alone_on_an_old_data_dir_runs_new_and_orphaned_work() {
    let scratch = TempDir::new().expect("temp dir");
    let mut agents = three_agents(scratch.path());
    // Finished jobs, submitted through every agent.
    let mut finished = Vec::new();
    for agent in &agents {
        finished.push(job_id(&ok(agent.cli(&["job", "run", "--count", "2", "--wait", "--", "true"]))));
    }
    // A service with an instance per node, each holding a third of a node's CPU.
    let service =
        job_id(&ok(agents[0].cli(&["job", "run", "--service", "--count", "3", "--cpu", "100", "--", "sleep", "600"])));
    wait_for("the service to run three instances", DEADLINE, || {
        let job = job_json(&agents[0], &service);
        let running = job["instances"].as_array()?.iter().filter(|i| i["status"] == "running").count();
        (running == 3).then_some(())
    });
    for agent in &mut agents {
        agent.kill9();
    }
    agents[0].restart();
    // New work runs on the lone survivor.
    let fresh = job_id(&ok(agents[0].cli(&["job", "run", "--wait", "--", "echo", "alone"])));
    assert_eq!(wait_terminal(&agents[0], &fresh)["status"], "succeeded");
    // The peers are certified dead; every instance of the service runs here again.
    wait_for("alpha to certify bravo and charlie dead", DEADLINE, || {
        let (_, nodes) = agents[0].get("/v1/nodes");
        nodes.as_array()?.iter().all(|n| n["name"] == "alpha" || n["state"] == "dead").then_some(())
    });
    wait_for("alpha to run all three service instances", DEADLINE, || {
        let job = job_json(&agents[0], &service);
        let instances = job["instances"].as_array()?;
        instances.iter().all(|i| i["status"] == "running" && i["node"] == "alpha").then_some(())
    });
    for id in &finished {
        assert_eq!(job_json(&agents[0], id)["status"], "succeeded", "{id}");
    }
}
