//! The `colony` command line: the agent, key generation, and the client commands that talk
//! to an agent's HTTP API.
//!
//! Exit codes: 0 success; 1 an error reported by the agent, a bad file, or (`job run
//! --wait`) a job that did not succeed; 2 a usage error, or the agent cannot be reached.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use colony::crdt::{InstanceStatus, JobKind, JobSpec};
use colony::{JobJson, Multiaddr, NodeJson};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The API address clients use when neither `--api` nor `COLONY_API` is given.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:7474";
/// How often `--wait` and `--follow` ask the agent again.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long a client waits to connect to the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for one reply (logs may be fetched from another node: the
/// facade gives that 10 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Colony: a masterless cluster orchestrator. Every machine runs the same agent; any agent
/// accepts jobs, and the cluster heals itself when machines die.
#[derive(Debug, Parser)]
#[command(name = "colony", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent on this machine: join (or start) a cluster and serve the HTTP API.
    Agent(AgentArgs),
    /// Generate a cluster key; only agents holding it can connect to each other.
    Keygen(KeygenArgs),
    /// Submit, inspect and stop jobs (talks to an agent's API).
    Job(JobArgs),
    /// Inspect nodes, and drain or remove the agent you talk to.
    Node(NodeArgs),
}

/// `colony agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Development mode: listen on 127.0.0.1 (a random port), no mDNS, data under the
    /// system temp dir (unless --data-dir).
    #[arg(long)]
    pub dev: bool,
    /// Where the agent keeps its identity, table and task logs [default: ./colony-data;
    /// with --dev: $TMPDIR/colony-dev-<api port>].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Peer-to-peer listen address (repeatable) [default: /ip4/0.0.0.0/tcp/7475; with
    /// --dev: /ip4/127.0.0.1/tcp/0].
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// A peer to join through, e.g. /ip4/10.0.0.1/tcp/7475 (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub seed: Vec<Multiaddr>,
    /// Where the HTTP API listens.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7474")]
    pub api: SocketAddr,
    /// This node's name [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// CPU offered to jobs, in thousandths of a core [default: cores × 1000].
    #[arg(long, value_name = "MILLICORES")]
    pub cpu: Option<u64>,
    /// Memory offered to jobs, in MiB [default: the machine's memory].
    #[arg(long, value_name = "MB")]
    pub memory: Option<u64>,
    /// A label for placement constraints (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub label: Vec<(String, String)>,
    /// The cluster key file (`colony keygen`); without it any peer can connect.
    #[arg(long, value_name = "FILE")]
    pub cluster_key: Option<PathBuf>,
    /// Require this bearer token (the file's first line) on every API call.
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Failure detection: how often each care-taker probes the nodes it watches.
    #[arg(long, value_name = "MS", default_value_t = colony::Timing::default().probe_interval_ms)]
    pub probe_interval_ms: u64,
    /// Failure detection: how long a direct probe waits before asking others to probe.
    #[arg(long, value_name = "MS", default_value_t = colony::Timing::default().probe_timeout_ms)]
    pub probe_timeout_ms: u64,
    /// Failure detection: how long a node stays suspect before it is certified dead.
    #[arg(long, value_name = "MS", default_value_t = colony::Timing::default().suspicion_ms)]
    pub suspicion_ms: u64,
    /// Failure detection: care-takers watching each node.
    #[arg(long, value_name = "K", default_value_t = colony::Timing::default().care_takers)]
    pub care_takers: usize,
    /// Placement: how long a claim must stand before its winner starts the work (a floor:
    /// the measured round trip raises it on slow networks).
    #[arg(long, value_name = "MS", default_value_t = colony::Timing::default().settle_ms)]
    pub settle_ms: u64,
}

/// `colony keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (never overwritten).
    #[arg(long, value_name = "FILE", default_value = "cluster.key")]
    pub out: PathBuf,
}

/// How client commands reach an agent.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The agent's API.
    #[arg(long, global = true, env = "COLONY_API", default_value = DEFAULT_API_URL, value_name = "URL")]
    pub api: String,
    /// Send the token in this file (its first line) as `Authorization: Bearer`.
    #[arg(long, global = true, env = "COLONY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// `colony job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Where the agent is.
    #[command(flatten)]
    pub client: ClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: JobCommand,
}

/// `colony job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a job and print its id: `colony job run [OPTIONS] -- CMD [ARGS...]` or `-f job.toml`.
    Run(RunArgs),
    /// List jobs.
    List(JsonFlag),
    /// Show a job: each instance, where it runs, and every attempt.
    Status(StatusArgs),
    /// Stop a job everywhere.
    Stop(IdArg),
    /// Print the output of a job's instance (fetched from whichever node ran it).
    Logs(LogsArgs),
}

/// `colony job run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A job spec in TOML (see examples/job.toml); the options below override its fields.
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with = "command")]
    pub file: Option<PathBuf>,
    /// The job's name [default: the command].
    #[arg(long)]
    pub name: Option<String>,
    /// CPU per instance, in thousandths of a core.
    #[arg(long, value_name = "MILLICORES")]
    pub cpu: Option<u64>,
    /// Memory per instance, in MiB (a hard limit where the node can enforce it).
    #[arg(long, value_name = "MB")]
    pub memory: Option<u64>,
    /// How many instances.
    #[arg(long, value_name = "K")]
    pub count: Option<u32>,
    /// Higher runs first when capacity is short (0..=100).
    #[arg(long, value_name = "P")]
    pub priority: Option<i32>,
    /// An environment variable for the command (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// A service: restarted whenever it exits, until stopped.
    #[arg(long)]
    pub service: bool,
    /// Wait until the job ends, showing progress on stderr; exit 0 only if every instance
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
    /// The command and its arguments (after `--`).
    #[arg(value_name = "CMD", trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// A `--json` flag.
#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `colony job status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id.
    pub id: String,
    /// Print the API's JSON.
    #[arg(long)]
    pub json: bool,
}

/// A job id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The job id.
    pub id: String,
}

/// `colony job logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The job id.
    pub id: String,
    /// Which instance.
    #[arg(long, default_value_t = 0)]
    pub index: u32,
    /// Keep printing new output until the job ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `colony node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Where the agent is.
    #[command(flatten)]
    pub client: ClientArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: NodeCommand,
}

/// `colony node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes of the cluster.
    List(JsonFlag),
    /// Make this agent take no new work and hand its work to others.
    Drain,
    /// Make this agent take work again.
    Undrain,
    /// Make this agent leave the cluster and shut down (its work moves elsewhere).
    Leave,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

// ---------------------------------------------------------------------------------------
// Errors that choose the exit code

/// The agent could not be reached at all (exit code 2).
#[derive(Debug)]
pub struct Unreachable {
    url: String,
    detail: String,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot reach the agent at {}: {} (is `colony agent` running?)", self.url, self.detail)
    }
}

impl std::error::Error for Unreachable {}

/// The command ran, and its answer is "no" (a job that did not succeed): exit code 1
/// without an error message (the reason was already printed).
#[derive(Debug)]
pub struct Unsuccessful;

impl std::fmt::Display for Unsuccessful {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("unsuccessful")
    }
}

impl std::error::Error for Unsuccessful {}

/// The exit code for an error of [`run_client`] or the agent.
pub fn exit_code_of(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Unreachable>().is_some() {
        2
    } else {
        1
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP client

/// A client of one agent's API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `args`, reading the token file if one is given.
    pub fn new(args: &ClientArgs) -> Result<Client> {
        let base = args.api.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--api must be an http:// or https:// URL, got `{}`", args.api);
        }
        let token = args.token_file.as_deref().map(read_token_file).transpose()?;
        let agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT).build();
        Ok(Client { base, token, agent })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let request = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }

    /// Sends a request and returns the JSON reply, or the agent's error as an error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let request = self.request(method, path);
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match result {
            Ok(response) => {
                let text = response.into_string().context("reading the agent's reply")?;
                if text.trim().is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&text).with_context(|| format!("the agent's reply is not JSON: {text}"))
            }
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                Err(anyhow!(server_error_message(status, &text)))
            }
            Err(ureq::Error::Transport(transport)) => {
                Err(anyhow::Error::new(Unreachable { url: self.base.clone(), detail: transport_detail(&transport) }))
            }
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let value = self.call("GET", path, None)?;
        serde_json::from_value(value).context("the agent's reply has an unexpected shape (is it the same version?)")
    }

    fn get_text(&self, path: &str) -> Result<Value> {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call("POST", path, body)
    }

    fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path, None)
    }
}

/// The one-line message for an error reply: the agent's `error` field when it sent JSON.
fn server_error_message(status: u16, body: &str) -> String {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            let body = body.trim();
            if body.is_empty() {
                format!("the agent answered HTTP {status}")
            } else {
                format!("the agent answered HTTP {status}: {body}")
            }
        });
    match status {
        401 => format!("{message} (HTTP 401; pass the token with --token-file or COLONY_TOKEN_FILE)"),
        _ => message,
    }
}

fn transport_detail(transport: &ureq::Transport) -> String {
    let mut detail = transport.message().map(str::to_string).unwrap_or_else(|| transport.kind().to_string());
    let mut source = std::error::Error::source(transport);
    while let Some(cause) = source {
        detail = format!("{detail}: {cause}");
        source = cause.source();
    }
    detail
}

/// The first line of a token file, trimmed; it must not be empty.
pub fn read_token_file(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token)
}

/// Percent-encodes one path segment (a job id typed by a user).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Client commands

/// Runs `colony job ...`.
pub fn run_job_command(args: JobArgs) -> Result<()> {
    let client = Client::new(&args.client)?;
    match args.command {
        JobCommand::Run(run) => job_run(&client, run),
        JobCommand::List(flag) => job_list(&client, flag.json),
        JobCommand::Status(status) => job_status(&client, &status.id, status.json),
        JobCommand::Stop(IdArg { id }) => {
            client.delete(&format!("/v1/jobs/{}", segment(&id)))?;
            eprintln!("job {id} is stopping");
            Ok(())
        }
        JobCommand::Logs(logs) => job_logs(&client, &logs),
    }
}

/// Runs `colony node ...`.
pub fn run_node_command(args: NodeArgs) -> Result<()> {
    let client = Client::new(&args.client)?;
    match args.command {
        NodeCommand::List(flag) => node_list(&client, flag.json),
        NodeCommand::Drain => {
            let reply = client.post("/v1/node/drain", None)?;
            eprintln!("node {} is draining: it takes no new work and hands its work to others", reply_id(&reply));
            Ok(())
        }
        NodeCommand::Undrain => {
            let reply = client.post("/v1/node/undrain", None)?;
            eprintln!("node {} takes work again", reply_id(&reply));
            Ok(())
        }
        NodeCommand::Leave => {
            let reply = client.post("/v1/node/leave", None)?;
            eprintln!("node {} is leaving the cluster and shutting down", reply_id(&reply));
            Ok(())
        }
    }
}

fn reply_id(reply: &Value) -> &str {
    reply.get("id").and_then(Value::as_str).unwrap_or("?")
}

/// The spec `colony job run` submits: the file's (or the command's), with the options
/// applied over it.
fn build_spec(run: &RunArgs) -> Result<JobSpec> {
    let mut spec = match &run.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the job file {}", path.display()))?;
            toml::from_str::<JobSpec>(&text).map_err(|e| anyhow!("invalid job file {}: {}", path.display(), e))?
        }
        None => {
            let Some((command, args)) = run.command.split_first() else {
                bail!("nothing to run: give a command (`colony job run -- CMD [ARGS...]`) or a file (`-f job.toml`)");
            };
            JobSpec::command(command.clone(), args.iter().cloned())
        }
    };
    if let Some(name) = &run.name {
        spec.name = name.clone();
    }
    if let Some(cpu) = run.cpu {
        spec.resources.cpu_millis = cpu;
    }
    if let Some(memory) = run.memory {
        spec.resources.memory_mb = memory;
    }
    if let Some(count) = run.count {
        spec.count = count;
    }
    if let Some(priority) = run.priority {
        spec.priority = priority;
    }
    for (key, value) in &run.env {
        spec.env.insert(key.clone(), value.clone());
    }
    if run.service {
        spec.kind = JobKind::Service;
    }
    Ok(spec)
}

fn job_run(client: &Client, run: RunArgs) -> Result<()> {
    let spec = build_spec(&run)?;
    let body = serde_json::to_value(&spec).context("encoding the job spec")?;
    let reply = client.post("/v1/jobs", Some(&body))?;
    let id =
        reply.get("id").and_then(Value::as_str).ok_or_else(|| anyhow!("the agent's reply has no job id: {reply}"))?;
    println!("{id}");
    // Let a script that reads the id proceed while we wait.
    let _ = std::io::stdout().flush();
    if run.wait {
        wait_for_job(client, id)
    } else {
        Ok(())
    }
}

/// Polls a job until it ends, printing progress on stderr when it changes.
fn wait_for_job(client: &Client, id: &str) -> Result<()> {
    let path = format!("/v1/jobs/{}", segment(id));
    let mut last_progress = String::new();
    loop {
        let job: JobJson = client.get(&path)?;
        let progress = progress_line(&job);
        if progress != last_progress {
            eprintln!("{progress}");
            last_progress = progress;
        }
        if job.status.is_terminal() {
            for instance in &job.instances {
                if instance.status != InstanceStatus::Succeeded {
                    eprintln!(
                        "  instance {}: {}{}",
                        instance.index,
                        label(&instance.status),
                        instance.exit_code.map(|c| format!(" (exit code {c})")).unwrap_or_default()
                    );
                }
            }
            if job.instances.iter().all(|i| i.status == InstanceStatus::Succeeded) {
                return Ok(());
            }
            return Err(anyhow::Error::new(Unsuccessful));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// `job <id>: running — 1 running, 2 succeeded (of 3)`.
fn progress_line(job: &JobJson) -> String {
    let failures: u32 = job.instances.iter().map(|i| i.failures).sum();
    let retried = if failures > 0 { format!(", {failures} failed attempts so far") } else { String::new() };
    format!("job {}: {} — {} (of {}){retried}", job.id, label(&job.status), instance_counts(job), job.instances.len())
}

/// `1 running, 2 succeeded`: instances by status, in lifecycle order, zeros left out.
fn instance_counts(job: &JobJson) -> String {
    let order = [
        InstanceStatus::Pending,
        InstanceStatus::Claimed,
        InstanceStatus::Running,
        InstanceStatus::Succeeded,
        InstanceStatus::Failed,
        InstanceStatus::Stopped,
    ];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|status| {
            let n = job.instances.iter().filter(|i| i.status == *status).count();
            (n > 0).then(|| format!("{n} {}", label(status)))
        })
        .collect();
    if parts.is_empty() {
        "no instances".into()
    } else {
        parts.join(", ")
    }
}

fn job_list(client: &Client, json: bool) -> Result<()> {
    if json {
        return print_json(&client.get_text("/v1/jobs")?);
    }
    let jobs: Vec<JobJson> = client.get("/v1/jobs")?;
    let now = now_ms();
    let mut rows = vec![["ID", "NAME", "STATUS", "INSTANCES", "NODES", "AGE"].map(String::from).to_vec()];
    for job in &jobs {
        let mut nodes: Vec<&str> = job.instances.iter().filter_map(|i| i.node.as_deref()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut status = label(&job.status);
        if job.duplicate_runs > 0 {
            status.push_str(&format!(" ({} dup)", job.duplicate_runs));
        }
        rows.push(vec![
            job.id.clone(),
            job.name.clone(),
            status,
            instance_counts(job),
            if nodes.is_empty() { "-".into() } else { nodes.join(",") },
            age(now.saturating_sub(job.submitted_at_ms)),
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn job_status(client: &Client, id: &str, json: bool) -> Result<()> {
    let path = format!("/v1/jobs/{}", segment(id));
    if json {
        return print_json(&client.get_text(&path)?);
    }
    let job: JobJson = client.get(&path)?;
    // Best effort: name the accepting node (it may have been compacted away since).
    let submitter = client
        .get::<Vec<NodeJson>>("/v1/nodes")
        .ok()
        .and_then(|nodes| nodes.into_iter().find(|n| n.id == job.submitted_by))
        .map(|n| n.name);
    print!("{}", describe_job(&job, submitter.as_deref(), now_ms()));
    Ok(())
}

/// The human form of `colony job status`.
fn describe_job(job: &JobJson, submitter_name: Option<&str>, now_ms: u64) -> String {
    let mut out = String::new();
    let spec = &job.spec;
    let mut command = vec![spec.command.clone()];
    command.extend(spec.args.iter().cloned());
    out.push_str(&format!("job:        {}\n", job.id));
    out.push_str(&format!("name:       {}\n", job.name));
    out.push_str(&format!("kind:       {}\n", label(&job.kind)));
    out.push_str(&format!("status:     {}\n", label(&job.status)));
    out.push_str(&format!("command:    {}\n", command.join(" ")));
    out.push_str(&format!(
        "resources:  {} millicores, {} MB per instance\n",
        spec.resources.cpu_millis, spec.resources.memory_mb
    ));
    out.push_str(&format!(
        "submitted:  {} ago, by {}\n",
        age(now_ms.saturating_sub(job.submitted_at_ms)),
        match submitter_name {
            Some(name) => format!("{name} ({})", job.submitted_by),
            None => job.submitted_by.clone(),
        }
    ));
    if job.duplicate_runs > 0 {
        out.push_str(&format!("duplicates: {} concurrent runs beyond one (after a partition)\n", job.duplicate_runs));
    }
    out.push_str(&format!("instances:  {} — {}\n", job.instances.len(), instance_counts(job)));
    for instance in &job.instances {
        let node = instance.node.as_deref().unwrap_or("-");
        let exit = instance.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
        let failures =
            if instance.failures > 0 { format!(", {} failed attempts", instance.failures) } else { String::new() };
        let duplicates = if instance.duplicate_runs > 0 {
            format!(", {} duplicate runs", instance.duplicate_runs)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  [{}] {} on {}, attempt {}{}{}{}\n",
            instance.index,
            label(&instance.status),
            node,
            instance.attempt,
            exit,
            failures,
            duplicates
        ));
        for run in &instance.runs {
            let duration = match run.finished_ms {
                Some(end) => format!(", ran {}", age(end.saturating_sub(run.started_ms))),
                None => String::new(),
            };
            let exit = run.exit_code.map(|c| format!(", exit code {c}")).unwrap_or_default();
            let reason = run.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
            out.push_str(&format!(
                "      attempt {} on {}: {}{}{}{}\n",
                run.attempt,
                run.node,
                label(&run.status),
                exit,
                duration,
                reason
            ));
        }
    }
    out
}

fn job_logs(client: &Client, args: &LogsArgs) -> Result<()> {
    let logs_path = format!("/v1/jobs/{}/logs?index={}", segment(&args.id), args.index);
    if !args.follow {
        let logs = client.get_text(&logs_path)?;
        print_stream(&mut std::io::stdout(), text_field(&logs, "stdout"))?;
        print_stream(&mut std::io::stderr(), text_field(&logs, "stderr"))?;
        return Ok(());
    }
    let job_path = format!("/v1/jobs/{}", segment(&args.id));
    let mut stdout = StreamFollower::default();
    let mut stderr = StreamFollower::default();
    let mut task = String::new();
    loop {
        // Read the status first: output read after the job ended is complete.
        let job: JobJson = client.get(&job_path)?;
        match client.get_text(&logs_path) {
            Ok(logs) => {
                let this_task = text_field(&logs, "task");
                if this_task != task {
                    if !task.is_empty() {
                        eprintln!("--- {this_task} on {} ---", text_field(&logs, "node"));
                    }
                    task = this_task.to_string();
                    stdout = StreamFollower::default();
                    stderr = StreamFollower::default();
                }
                print_stream(&mut std::io::stdout(), &stdout.advance(text_field(&logs, "stdout")))?;
                print_stream(&mut std::io::stderr(), &stderr.advance(text_field(&logs, "stderr")))?;
            }
            // No run yet (or the runner is briefly unreachable): keep waiting while it lives.
            Err(error) if error.downcast_ref::<Unreachable>().is_none() && !job.status.is_terminal() => {
                tracing::debug!(%error, "no logs yet");
            }
            Err(error) => return Err(error),
        }
        if job.status.is_terminal() {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// How much of the end of what was printed `--follow` looks for when the tail window moved.
const FOLLOW_ANCHOR_BYTES: usize = 256;

/// What has been printed of one log stream whose reply is the tail of the output (at most
/// 1 MiB): prints only what is new, also when the tail window has moved.
#[derive(Default)]
struct StreamFollower {
    printed: String,
}

impl StreamFollower {
    /// The part of `current` not printed yet.
    fn advance(&mut self, current: &str) -> String {
        let new = if let Some(rest) = current.strip_prefix(self.printed.as_str()) {
            rest.to_string()
        } else {
            // The window moved: find where the last printed bytes are in it. (Output that
            // repeats itself exactly over the anchor's length can make this skip a little.)
            let anchor_len = self.printed.len().min(FOLLOW_ANCHOR_BYTES);
            let mut anchor_start = self.printed.len() - anchor_len;
            while !self.printed.is_char_boundary(anchor_start) {
                anchor_start += 1;
            }
            let anchor = &self.printed[anchor_start..];
            match current.rfind(anchor) {
                Some(at) if !anchor.is_empty() => current[at + anchor.len()..].to_string(),
                _ => format!("[... output skipped ...]\n{current}"),
            }
        };
        self.printed = current.to_string();
        new
    }
}

fn text_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("")
}

fn print_stream(out: &mut impl Write, text: &str) -> Result<()> {
    if !text.is_empty() {
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

fn node_list(client: &Client, json: bool) -> Result<()> {
    if json {
        return print_json(&client.get_text("/v1/nodes")?);
    }
    let nodes: Vec<NodeJson> = client.get("/v1/nodes")?;
    let mut rows = vec![["NAME", "ID", "STATE", "CPU", "MEM", "ALLOC", "ADDRS"].map(String::from).to_vec()];
    for node in &nodes {
        let mut state = label(&node.state);
        let mode = label(&node.mode);
        if mode != "active" && mode != state {
            state = format!("{state},{mode}");
        }
        rows.push(vec![
            node.name.clone(),
            node.id.clone(),
            state,
            format!("{}m", node.capacity.cpu_millis),
            format!("{}MB", node.capacity.memory_mb),
            format!("{}m/{}MB", node.allocated.cpu_millis, node.allocated.memory_mb),
            if node.addrs.is_empty() { "-".into() } else { node.addrs.join(",") },
        ]);
    }
    print_table(&rows);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Output helpers

/// The serde name of an enum value (`succeeded`, `draining`).
fn label<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as left-aligned columns, two spaces apart.
fn print_table(rows: &[Vec<String>]) {
    print!("{}", format_table(rows));
}

fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `45s`, `12m`, `3h`, `2d`.
fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------------------------------
// keygen

/// Runs `colony keygen`: writes a new key readable by its owner only, prints its fingerprint.
pub fn keygen(args: &KeygenArgs) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = colony::ClusterKey::generate();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.out)
        .with_context(|| format!("cannot create {} (an existing key is never overwritten)", args.out.display()))?;
    file.write_all(key.to_file_string().as_bytes())?;
    file.sync_all()?;
    println!("{}", key.fingerprint());
    eprintln!(
        "wrote a new cluster key to {}; copy it to every machine and start agents with --cluster-key {}",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The agent

/// The agent's settings, resolved from its arguments.
#[derive(Debug, PartialEq)]
pub struct AgentPlan {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Peer-to-peer listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Whether mDNS is on.
    pub mdns: bool,
}

/// Resolves the defaults that depend on `--dev`.
pub fn plan_agent(args: &AgentArgs) -> Result<AgentPlan> {
    let data_dir = match (&args.data_dir, args.dev) {
        (Some(dir), _) => dir.clone(),
        (None, true) => std::env::temp_dir().join(format!("colony-dev-{}", args.api.port())),
        (None, false) => PathBuf::from("colony-data"),
    };
    let listen = if !args.listen.is_empty() {
        args.listen.clone()
    } else if args.dev {
        vec!["/ip4/127.0.0.1/tcp/0".parse().context("the dev listen address")?]
    } else {
        vec!["/ip4/0.0.0.0/tcp/7475".parse().context("the default listen address")?]
    };
    Ok(AgentPlan { data_dir, listen, mdns: !(args.dev || args.no_mdns) })
}

/// A key or token file others can read is a key others may have.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = %format!("{:o}", mode & 0o777), "the file is readable by other users; chmod 600 it");
        }
    }
}

/// Runs `colony agent` until SIGINT, SIGTERM or `POST /v1/node/leave`, then leaves the
/// cluster gracefully.
pub async fn run_agent(args: AgentArgs) -> Result<()> {
    let plan = plan_agent(&args)?;
    let token = args.api_token_file.as_deref().map(read_token_file).transpose()?;
    if let Some(path) = &args.api_token_file {
        warn_if_readable_by_others(path);
    }
    let cluster_key = match &args.cluster_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the cluster key {}", path.display()))?;
            warn_if_readable_by_others(path);
            Some(
                colony::ClusterKey::from_file_string(&text)
                    .with_context(|| format!("invalid cluster key file {}", path.display()))?,
            )
        }
        None => None,
    };
    // Bind the API first: a port in use fails before the node joins anything.
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen for the API on {}", args.api))?;
    let api_addr = listener.local_addr().context("the API's address")?;
    if token.is_none() && !api_addr.ip().is_loopback() {
        tracing::warn!(api = %api_addr, "the API listens beyond loopback without a token: anyone who can reach it controls the cluster (use --api-token-file)");
    }
    if cluster_key.is_none() && !args.dev {
        tracing::warn!("no --cluster-key: any peer that can reach this node can join the cluster");
    }

    let timing = colony::Timing {
        probe_interval_ms: args.probe_interval_ms.max(1),
        probe_timeout_ms: args.probe_timeout_ms.max(1),
        suspicion_ms: args.suspicion_ms,
        care_takers: args.care_takers.max(1),
        settle_ms: args.settle_ms,
        ..colony::Timing::default()
    };
    let mut builder = colony::Node::builder().data_dir(&plan.data_dir).mdns(plan.mdns).timing(timing);
    for addr in &plan.listen {
        builder = builder.listen(addr.clone());
    }
    for addr in &args.seed {
        builder = builder.seed(addr.clone());
    }
    if let Some(name) = &args.name {
        builder = builder.name(name.clone());
    }
    if let Some(key) = cluster_key {
        builder = builder.cluster_key(key);
    }
    if let Some(cpu) = args.cpu {
        builder = builder.cpu_millis(cpu);
    }
    if let Some(memory) = args.memory {
        builder = builder.memory_mb(memory);
    }
    for (key, value) in &args.label {
        builder = builder.label(key.clone(), value.clone());
    }
    let node = builder
        .start()
        .await
        .with_context(|| format!("cannot start the node (data dir {})", plan.data_dir.display()))?;

    let (leave_tx, mut leave_rx) = tokio::sync::mpsc::channel(1);
    let router = colony::api::router_with_leave(node.clone(), token, leave_tx);
    let (stop_serving_tx, stop_serving_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(colony::api::serve_until(listener, router, async move {
        let _ = stop_serving_rx.await;
    }));
    let listen: Vec<String> = node.listen_addrs().iter().map(ToString::to_string).collect();
    tracing::info!(
        id = %node.id(),
        name = %node.name(),
        listen = %listen.join(","),
        api = %format!("http://{api_addr}"),
        data_dir = %plan.data_dir.display(),
        "colony agent ready"
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let server_failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: leaving the cluster"); None }
        _ = sigterm.recv() => { tracing::info!("SIGTERM: leaving the cluster"); None }
        _ = leave_rx.recv() => { tracing::info!("leave requested over the API: leaving the cluster"); None }
        result = &mut server => Some(result),
    };
    // A second signal during the graceful shutdown stops at once.
    let shutdown = node.shutdown();
    tokio::select! {
        () = shutdown => {}
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("second SIGINT: stopping without finishing the shutdown");
            std::process::exit(130);
        }
        _ = sigterm.recv() => {
            tracing::warn!("second SIGTERM: stopping without finishing the shutdown");
            std::process::exit(143);
        }
    }
    tracing::info!("node stopped");
    if let Some(result) = server_failed {
        return match result {
            Ok(Ok(())) => Err(anyhow!("the API server stopped unexpectedly")),
            Ok(Err(error)) => Err(anyhow!(error).context("the API server failed")),
            Err(error) => Err(anyhow!("the API server task failed: {error}")),
        };
    }
    let _ = stop_serving_tx.send(());
    // Give in-flight replies (the reply to `leave`) a moment to go out.
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(anyhow!(error).context("the API server failed")),
        Ok(Err(error)) => Err(anyhow!("the API server task failed: {error}")),
        Err(_) => {
            tracing::warn!("the API server did not finish its replies within 5 s");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("colony").chain(args.iter().copied())).expect("parses")
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let mut all = vec!["job", "run"];
        all.extend_from_slice(args);
        match parse(&all).command {
            Command::Job(JobArgs { command: JobCommand::Run(run), .. }) => run,
            other => panic!("not a job run: {other:?}"),
        }
    }

    #[test]
    fn every_command_says_what_it_does() {
        fn check(command: &clap::Command, path: &str) {
            assert!(command.get_about().is_some(), "`{path}` has no one-line about");
            for sub in command.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "colony");
    }

    #[test]
    fn job_run_takes_the_command_after_its_options() {
        let run = run_args(&["--count", "2", "--env", "A=1", "--", "sh", "-c", "exit 3"]);
        assert_eq!(run.command, ["sh", "-c", "exit 3"]);
        let spec = build_spec(&run).unwrap();
        assert_eq!(spec.count, 2);
        assert_eq!(spec.command, "sh");
        assert_eq!(spec.args, ["-c", "exit 3"]);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        // Without `--`, options after the command belong to the command.
        let run = run_args(&["--wait", "echo", "--count", "5"]);
        assert!(run.wait);
        assert_eq!(run.command, ["echo", "--count", "5"]);
    }

    #[test]
    fn job_run_needs_a_command_or_a_file() {
        assert!(build_spec(&run_args(&[])).is_err());
        assert!(Cli::try_parse_from(["colony", "job", "run", "-f", "x.toml", "--", "echo"]).is_err());
    }

    #[test]
    fn client_options_go_anywhere_after_the_group() {
        let cli = parse(&["job", "list", "--api", "http://h:1", "--json"]);
        let Command::Job(job) = cli.command else { panic!() };
        assert_eq!(job.client.api, "http://h:1");
        let cli = parse(&["node", "--api", "http://h:2", "list"]);
        let Command::Node(node) = cli.command else { panic!() };
        assert_eq!(node.client.api, "http://h:2");
    }

    #[test]
    fn the_example_job_file_parses_and_is_valid() {
        let text = include_str!("../examples/job.toml");
        let spec: JobSpec = toml::from_str(text).expect("examples/job.toml parses");
        spec.validate().expect("examples/job.toml is valid");
    }

    #[test]
    fn dev_mode_changes_the_defaults() {
        let Command::Agent(args) = parse(&["agent", "--dev", "--api", "127.0.0.1:9999"]).command else { panic!() };
        let plan = plan_agent(&args).unwrap();
        assert_eq!(plan.data_dir, std::env::temp_dir().join("colony-dev-9999"));
        assert_eq!(plan.listen, vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]);
        assert!(!plan.mdns);
        let Command::Agent(args) = parse(&["agent"]).command else { panic!() };
        let plan = plan_agent(&args).unwrap();
        assert_eq!(plan.data_dir, PathBuf::from("colony-data"));
        assert_eq!(plan.listen, vec!["/ip4/0.0.0.0/tcp/7475".parse::<Multiaddr>().unwrap()]);
        assert!(plan.mdns);
    }

    #[test]
    fn followed_streams_print_only_what_is_new() {
        let mut follower = StreamFollower::default();
        assert_eq!(follower.advance("a\n"), "a\n");
        assert_eq!(follower.advance("a\nb\n"), "b\n");
        assert_eq!(follower.advance("a\nb\n"), "");
        // The tail window moved past the start.
        let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let mut follower = StreamFollower::default();
        assert_eq!(follower.advance(&lines), lines);
        let moved = format!("{}line 100\n", &lines[300..]);
        assert_eq!(follower.advance(&moved), "line 100\n");
        let mut follower = StreamFollower::default();
        follower.advance("xyz");
        assert_eq!(follower.advance("something else"), "[... output skipped ...]\nsomething else");
    }

    #[test]
    fn job_status_shows_every_run_and_duplicates() {
        let run = |node: &str, status: &str, exit: Option<i32>| {
            serde_json::json!({"attempt": 0, "node": node, "node_id": format!("id-{node}"), "status": status,
                "started_ms": 1_000, "finished_ms": 3_000, "exit_code": exit, "reason": null})
        };
        let job: JobJson = serde_json::from_value(serde_json::json!({
            "id": "j1", "name": "demo", "status": "succeeded", "kind": "batch", "submitted_by": "id-a",
            "submitted_at_ms": 1_000, "duplicate_runs": 1,
            "instances": [{"index": 0, "node": "a", "node_id": "id-a", "status": "succeeded", "exit_code": 0,
                "attempt": 0, "failures": 0, "duplicate_runs": 1,
                "runs": [run("a", "succeeded", Some(0)), run("b", "stopped", Some(143))]}],
            "spec": {"command": "echo", "args": ["hi"]},
        }))
        .expect("a JobJson");
        let text = describe_job(&job, Some("a"), 61_000);
        assert!(text.contains("submitted:  1m ago, by a (id-a)"), "{text}");
        assert!(text.contains("[0] succeeded on a, attempt 0, exit code 0, 1 duplicate runs"), "{text}");
        assert!(text.contains("attempt 0 on a: succeeded, exit code 0, ran 2.0s"), "{text}");
        assert!(text.contains("attempt 0 on b: stopped, exit code 143"), "{text}");
        assert!(text.contains("duplicates: 1"), "{text}");
    }

    #[test]
    fn server_errors_read_well() {
        let body = r#"{"error":"invalid job spec: field `count`: must be between 1 and 1000","field":"count"}"#;
        assert_eq!(server_error_message(400, body), "invalid job spec: field `count`: must be between 1 and 1000");
        assert_eq!(server_error_message(502, "Bad Gateway"), "the agent answered HTTP 502: Bad Gateway");
        assert!(server_error_message(401, r#"{"error":"wrong API token"}"#).contains("--token-file"));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(segment("abc-1_2.3~"), "abc-1_2.3~");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
        assert_eq!(age(1_500), "1.5s");
        assert_eq!(age(75_000), "1m");
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(parse_key_value("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_key_value("=x").is_err());
        let table = format_table(&[vec!["A".into(), "BB".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(table, "A    BB\nccc  d\n");
    }
}
