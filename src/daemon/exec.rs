//! The process driver: runs task processes on this Linux node.
//!
//! Every task process is started in its own process group (so a stop signal
//! reaches everything it forked), with stdin closed, stdout and stderr
//! appended to `<log_dir>/<task_id>.stdout` / `.stderr`, and an environment
//! made only of the task's own variables plus the daemon's `PATH` and `HOME`.
//!
//! # Memory limits
//!
//! [`ProcessDriver::new`] picks one mechanism, once:
//!
//! * `cgroup-v2` — when `/sys/fs/cgroup` is a writable cgroup v2 hierarchy with
//!   the memory controller. The driver creates a parent group
//!   `/sys/fs/cgroup/colony-<daemon pid>` (never joining it itself, which keeps
//!   the "no internal processes" rule satisfied) and one child group per task
//!   with `memory.max` (and `memory.swap.max = 0`, and `cpu.max` when the cpu
//!   controller is available). The child joins its group before `exec`, so
//!   the limit holds from the first instruction. Exceeding it gets the task
//!   OOM-killed (`SIGKILL`). When the task ends the whole group is killed
//!   and removed.
//! * `rlimit-as` — otherwise, `RLIMIT_AS` (address space) is set before
//!   `exec`. Allocations past the limit fail inside the task, which usually
//!   exits non-zero. This limits *virtual* memory, so runtimes that reserve
//!   large address ranges up front (Go, the JVM) may fail to start under a
//!   small limit.
//! * `none` — no mechanism could be found; `memory_mb` is ignored.
//!
//! `cpu_millis` (thousandths of a core) is enforced only under `cgroup-v2`
//! with the cpu controller; otherwise it is advisory.
//!
//! # Process lifetime
//!
//! A task's lifetime is that of its main process: when it exits,
//! [`RunningProcess::wait`] kills whatever is left of its process group (and
//! of its cgroup) before returning.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Longest task id accepted, in bytes (it becomes part of file names).
pub const MAX_TASK_ID_BYTES: usize = 128;
/// Most arguments a [`ProcessSpec`] may carry.
pub const MAX_ARGS: usize = 4096;
/// Most environment variables a [`ProcessSpec`] may carry.
pub const MAX_ENV_VARS: usize = 4096;
/// Largest memory limit honoured, in MiB (1 TiB); larger values mean "no limit".
pub const MAX_MEMORY_MB: u64 = 1 << 20;

/// Root of the cgroup v2 hierarchy probed by [`ProcessDriver::new`].
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long [`RunningProcess::wait`] keeps retrying to remove a task cgroup.
const CGROUP_REMOVE_ATTEMPTS: u32 = 40;
/// Pause between cgroup removal attempts.
const CGROUP_REMOVE_PAUSE: Duration = Duration::from_millis(25);
/// Most stale `colony-*` groups examined at start-up.
const MAX_STALE_GROUPS: usize = 64;
/// The cgroup v2 `cpu.max` period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Errors from starting a task process.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The task id cannot be used to name log files.
    #[error("invalid task id {task_id:?}: {reason}")]
    InvalidTaskId {
        /// The rejected id.
        task_id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The process spec is malformed (empty command, NUL bytes, too many entries...).
    #[error("invalid process spec: {reason}")]
    InvalidSpec {
        /// What is wrong with it.
        reason: String,
    },
    /// The log directory could not be created.
    #[error("cannot create log directory {path}: {source}")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A log file could not be opened for appending.
    #[error("cannot open log file {path}: {source}")]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The working directory does not exist or is not a directory.
    #[error("working directory {path} does not exist or is not a directory")]
    Workdir {
        /// The requested working directory.
        path: PathBuf,
    },
    /// The task's cgroup could not be set up.
    #[error("cannot set up cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory or control file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The process could not be spawned (command not found, not executable...).
    #[error("cannot start command {command:?}: {source}")]
    Spawn {
        /// The command that failed to start.
        command: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// What to run for a task.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProcessSpec {
    /// The program: a path, or a name looked up in `PATH`.
    pub command: String,
    /// Arguments, not including the program name.
    pub args: Vec<String>,
    /// The task's environment, added to the inherited `PATH` and `HOME`
    /// (and overriding them when it names them).
    pub env: BTreeMap<String, String>,
    /// Working directory; the daemon's own when `None`.
    pub workdir: Option<PathBuf>,
    /// Memory limit in MiB; 0 means no limit.
    pub memory_mb: u64,
    /// CPU limit in thousandths of a core; 0 means no limit.
    pub cpu_millis: u64,
}

/// How a task process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitOutcome {
    /// It exited by itself with this status code.
    Exited {
        /// The exit status (0..=255).
        code: i32,
    },
    /// It was killed by this signal (including an OOM kill, `SIGKILL`).
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// Its exit status could not be collected (waiting on it failed).
    Unknown,
}

impl ExitOutcome {
    /// A shell-style exit code: the status code, `128 + signal` for a
    /// signal, and -1 when unknown.
    pub fn exit_code(&self) -> i32 {
        match *self {
            ExitOutcome::Exited { code } => code,
            ExitOutcome::Signaled { signal } => 128i32.saturating_add(signal),
            ExitOutcome::Unknown => -1,
        }
    }

    /// Whether the process exited with status 0.
    pub fn success(&self) -> bool {
        matches!(self, ExitOutcome::Exited { code: 0 })
    }

    fn from_status(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            ExitOutcome::Exited { code }
        } else if let Some(signal) = status.signal() {
            ExitOutcome::Signaled { signal }
        } else {
            ExitOutcome::Unknown
        }
    }
}

/// The memory-limit mechanism in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mechanism {
    CgroupV2,
    RlimitAs,
    None,
}

impl Mechanism {
    fn name(self) -> &'static str {
        match self {
            Mechanism::CgroupV2 => "cgroup-v2",
            Mechanism::RlimitAs => "rlimit-as",
            Mechanism::None => "none",
        }
    }
}

/// The parent cgroup owned by this driver.
#[derive(Debug)]
struct CgroupParent {
    /// `/sys/fs/cgroup/colony-<pid>`.
    dir: PathBuf,
    /// Whether `cpu.max` can be set in its children.
    cpu: bool,
}

#[derive(Debug)]
struct DriverInner {
    log_dir: PathBuf,
    mechanism: Mechanism,
    cgroup: Option<CgroupParent>,
    next_group: AtomicU64,
}

impl Drop for DriverInner {
    fn drop(&mut self) {
        if let Some(parent) = &self.cgroup {
            // Succeeds only once every task group is gone; otherwise the
            // groups of still-running tasks keep it.
            let _ = fs::remove_dir(&parent.dir);
        }
    }
}

/// Starts and supervises task processes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProcessDriver {
    inner: Arc<DriverInner>,
}

impl ProcessDriver {
    /// Creates a driver writing task logs under `log_dir` (created if
    /// missing), and detects the memory-limit mechanism once.
    pub fn new(log_dir: PathBuf) -> Result<Self, ExecError> {
        fs::create_dir_all(&log_dir).map_err(|source| ExecError::LogDir { path: log_dir.clone(), source })?;
        let cgroup = detect_cgroup_v2(Path::new(CGROUP_ROOT));
        let mechanism = if cgroup.is_some() {
            Mechanism::CgroupV2
        } else if rlimit_as_available() {
            Mechanism::RlimitAs
        } else {
            Mechanism::None
        };
        tracing::info!(mechanism = mechanism.name(), "process driver memory limits");
        Ok(ProcessDriver { inner: Arc::new(DriverInner { log_dir, mechanism, cgroup, next_group: AtomicU64::new(0) }) })
    }

    /// The memory-limit mechanism in use: `"cgroup-v2"`, `"rlimit-as"` or `"none"`.
    pub fn memory_limit_mechanism(&self) -> &'static str {
        self.inner.mechanism.name()
    }

    /// The stdout and stderr log files of a task.
    pub fn log_paths(&self, task_id: &str) -> (PathBuf, PathBuf) {
        let dir = &self.inner.log_dir;
        (dir.join(format!("{task_id}.stdout")), dir.join(format!("{task_id}.stderr")))
    }

    /// Starts a task process and returns as soon as it is running.
    ///
    /// Log files are appended to, so a restarted task keeps its history.
    pub async fn start(&self, task_id: &str, spec: &ProcessSpec) -> Result<RunningProcess, ExecError> {
        validate_task_id(task_id)?;
        validate_spec(spec)?;
        if let Some(dir) = &spec.workdir {
            if !dir.is_dir() {
                return Err(ExecError::Workdir { path: dir.clone() });
            }
        }

        fs::create_dir_all(&self.inner.log_dir)
            .map_err(|source| ExecError::LogDir { path: self.inner.log_dir.clone(), source })?;
        let (out_path, err_path) = self.log_paths(task_id);
        let stdout = open_log(&out_path)?;
        let stderr = open_log(&err_path)?;

        let mut cmd = Command::new(&spec.command);
        cmd.args(&spec.args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        for key in ["PATH", "HOME"] {
            if let Some(value) = std::env::var_os(key) {
                cmd.env(key, value);
            }
        }
        cmd.envs(&spec.env);
        if let Some(dir) = &spec.workdir {
            cmd.current_dir(dir);
        }

        let memory_bytes = memory_limit_bytes(spec.memory_mb);
        let mut cgroup = None;
        let mut procs_file = None;
        match self.inner.mechanism {
            Mechanism::CgroupV2 => {
                if let Some(parent) = &self.inner.cgroup {
                    let seq = self.inner.next_group.fetch_add(1, Ordering::Relaxed);
                    let group = TaskCgroup::create(parent, seq, task_id, memory_bytes, spec)?;
                    let procs_path = group.dir.join("cgroup.procs");
                    match OpenOptions::new().write(true).open(&procs_path) {
                        Ok(file) => procs_file = Some(file),
                        Err(source) => {
                            group.remove_now();
                            return Err(ExecError::Cgroup { path: procs_path, source });
                        }
                    }
                    cgroup = Some(group);
                }
            }
            Mechanism::RlimitAs | Mechanism::None => {}
        }
        let rlimit = match self.inner.mechanism {
            Mechanism::RlimitAs => memory_bytes,
            Mechanism::CgroupV2 | Mechanism::None => None,
        };
        install_pre_exec(&mut cmd, procs_file.as_ref().map(AsRawFd::as_raw_fd), rlimit);

        let spawned = cmd.spawn();
        // The child has joined its cgroup (or failed to) by now.
        drop(procs_file);
        let child = match spawned {
            Ok(child) => child,
            Err(source) => {
                if let Some(group) = &cgroup {
                    group.remove_now();
                }
                return Err(ExecError::Spawn { command: spec.command.clone(), source });
            }
        };
        let Some(pid) = child.id() else {
            // Cannot happen for a freshly spawned child; stay safe anyway.
            return Err(ExecError::Spawn {
                command: spec.command.clone(),
                source: io::Error::other("spawned child has no pid"),
            });
        };
        tracing::debug!(task_id, pid, command = %spec.command, "started task process");
        Ok(RunningProcess {
            pid,
            child,
            cgroup,
            exited: Arc::new(AtomicBool::new(false)),
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

/// A started task process. Call [`RunningProcess::wait`] to collect its exit
/// and clean up after it; dropping it instead leaves the process running
/// (it is not killed) and its cgroup, if any, in place.
#[derive(Debug)]
pub struct RunningProcess {
    /// The process id, which is also its process-group id.
    pub pid: u32,
    child: Child,
    cgroup: Option<TaskCgroup>,
    exited: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
}

impl RunningProcess {
    /// Waits for the process to exit, then kills whatever is left of its
    /// process group and cgroup and removes the cgroup.
    pub async fn wait(mut self) -> ExitOutcome {
        let outcome = match self.child.wait().await {
            Ok(status) => ExitOutcome::from_status(status),
            Err(err) => {
                tracing::warn!(pid = self.pid, error = %err, "waiting on task process failed");
                ExitOutcome::Unknown
            }
        };
        self.exited.store(true, Ordering::SeqCst);
        // Leftover members of the group (background children) die with the task.
        let _ = signal_group(self.pid, libc::SIGKILL);
        if let Some(group) = self.cgroup.take() {
            group.kill();
            group.remove().await;
        }
        outcome
    }

    /// A handle that can stop the process from elsewhere.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            pgid: self.pid,
            exited: Arc::clone(&self.exited),
            cgroup: self.cgroup.as_ref().map(|g| g.dir.clone()),
            runtime: self.runtime.clone(),
        }
    }
}

/// Stops a task's process group. Clone and send freely.
#[derive(Debug, Clone)]
pub struct KillHandle {
    pgid: u32,
    exited: Arc<AtomicBool>,
    cgroup: Option<PathBuf>,
    runtime: tokio::runtime::Handle,
}

impl KillHandle {
    /// Sends `SIGTERM` to the process group, then `SIGKILL` after `grace`
    /// if anything in it is still alive. Never blocks: the escalation runs
    /// as a tokio task. A zero `grace` kills at once. Does nothing once the
    /// process has been waited for.
    pub fn kill(&self, grace: Duration) {
        if self.exited.load(Ordering::SeqCst) {
            return;
        }
        if grace.is_zero() {
            self.kill_now();
            return;
        }
        let _ = signal_group(self.pgid, libc::SIGTERM);
        let this = self.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            if !this.exited.load(Ordering::SeqCst) && group_alive(this.pgid) {
                tracing::debug!(pgid = this.pgid, "grace period over, sending SIGKILL");
                this.kill_now();
            }
        });
    }

    fn kill_now(&self) {
        let _ = signal_group(self.pgid, libc::SIGKILL);
        if let Some(dir) = &self.cgroup {
            kill_cgroup(dir);
        }
    }
}

/// Best-effort `SIGKILL` of a whole process group, e.g. children of a
/// previous daemon run recorded in a pid file. Refuses group ids 0 and 1
/// and the caller's own group. Returns whether the signal was delivered.
pub fn kill_process_group(pgid: u32) -> bool {
    signal_group(pgid, libc::SIGKILL).is_ok()
}

/// Reads at most the last `max_bytes` of a file.
pub fn read_log_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::new();
    // The file may grow while we read; never return more than asked.
    file.take(max_bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn open_log(path: &Path) -> Result<File, ExecError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ExecError::LogFile { path: path.to_path_buf(), source })
}

fn validate_task_id(task_id: &str) -> Result<(), ExecError> {
    let reason = if task_id.is_empty() {
        Some("empty")
    } else if task_id.len() > MAX_TASK_ID_BYTES {
        Some("longer than 128 bytes")
    } else if task_id.starts_with('.') {
        Some("starts with '.'")
    } else if task_id.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
        Some("contains a path separator or control character")
    } else {
        None
    };
    match reason {
        Some(reason) => {
            Err(ExecError::InvalidTaskId { task_id: task_id.chars().take(MAX_TASK_ID_BYTES).collect(), reason })
        }
        None => Ok(()),
    }
}

fn validate_spec(spec: &ProcessSpec) -> Result<(), ExecError> {
    let invalid = |reason: String| Err(ExecError::InvalidSpec { reason });
    if spec.command.is_empty() {
        return invalid("empty command".into());
    }
    if spec.command.contains('\0') {
        return invalid("command contains a NUL byte".into());
    }
    if spec.args.len() > MAX_ARGS {
        return invalid(format!("more than {MAX_ARGS} arguments"));
    }
    if spec.args.iter().any(|a| a.contains('\0')) {
        return invalid("an argument contains a NUL byte".into());
    }
    if spec.env.len() > MAX_ENV_VARS {
        return invalid(format!("more than {MAX_ENV_VARS} environment variables"));
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return invalid(format!("bad environment variable name {:?}", key.chars().take(64).collect::<String>()));
        }
        if value.contains('\0') {
            return invalid(format!("environment variable {key} contains a NUL byte"));
        }
    }
    Ok(())
}

fn memory_limit_bytes(memory_mb: u64) -> Option<u64> {
    if memory_mb == 0 || memory_mb > MAX_MEMORY_MB {
        None
    } else {
        Some(memory_mb.saturating_mul(1024 * 1024))
    }
}

/// Arranges for the child, between fork and exec, to join its cgroup and/or
/// lower its address-space limit.
#[allow(unsafe_code)]
fn install_pre_exec(cmd: &mut Command, cgroup_procs: Option<i32>, rlimit_bytes: Option<u64>) {
    if cgroup_procs.is_none() && rlimit_bytes.is_none() {
        return;
    }
    let hook = move || -> io::Result<()> {
        if let Some(fd) = cgroup_procs {
            // Writing "0" to cgroup.procs moves the writing process.
            // SAFETY: `fd` is open for the duration of spawn (the parent
            // holds the File until spawn returns) and the buffer is valid.
            let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            if written != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(bytes) = rlimit_bytes {
            let limit = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: bytes as libc::rlim_t };
            // SAFETY: setrlimit is async-signal-safe and `limit` is valid.
            if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls (write,
    // setrlimit) and does not allocate or take locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

#[allow(unsafe_code)]
fn rlimit_as_available() -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes into the valid struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) == 0 }
}

/// Sends `signal` to process group `pgid`, refusing ids that would hit
/// more than one group (0, 1, out of range) or our own group.
#[allow(unsafe_code)]
fn signal_group(pgid: u32, signal: i32) -> io::Result<()> {
    let Ok(pgid) = i32::try_from(pgid) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: getpgrp has no preconditions.
    let own = unsafe { libc::getpgrp() };
    if pgid <= 1 || pgid == own {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid
    // addresses exactly the process group `pgid` (> 1).
    if unsafe { libc::kill(-pgid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether any process (zombies included) is left in the group.
fn group_alive(pgid: u32) -> bool {
    signal_group(pgid, 0).is_ok()
}

/// Finds a usable cgroup v2 hierarchy with the memory controller and
/// creates this daemon's parent group in it.
fn detect_cgroup_v2(root: &Path) -> Option<CgroupParent> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).ok()?;
    if !has_word(&controllers, "memory") {
        return None;
    }
    if let Err(err) = enable_controller(root, "memory") {
        tracing::debug!(error = %err, "cannot enable the memory controller at the cgroup root");
        return None;
    }
    let cpu = has_word(&controllers, "cpu") && enable_controller(root, "cpu").is_ok();
    cleanup_stale_groups(root);

    let dir = root.join(format!("colony-{}", std::process::id()));
    if let Err(err) = fs::create_dir(&dir) {
        if err.kind() != io::ErrorKind::AlreadyExists {
            tracing::debug!(error = %err, "cannot create the colony cgroup");
            return None;
        }
    }
    let give_up = |why: String| {
        tracing::debug!("{why}; falling back from cgroup v2");
        let _ = fs::remove_dir(&dir);
        None
    };
    // We never join `dir`, so enabling controllers for its children is allowed.
    if let Err(err) = enable_controller(&dir, "memory") {
        return give_up(format!("cannot delegate memory to {}: {err}", dir.display()));
    }
    let cpu = cpu && enable_controller(&dir, "cpu").is_ok();
    let probe = dir.join("probe");
    let probe_ok = fs::create_dir(&probe).map(|()| probe.join("memory.max").is_file()).unwrap_or(false);
    let _ = fs::remove_dir(&probe);
    if !probe_ok {
        return give_up("child cgroups get no memory.max".into());
    }
    Some(CgroupParent { dir, cpu })
}

fn has_word(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

fn enable_controller(dir: &Path, controller: &str) -> io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control)?;
    if has_word(&enabled, controller) {
        return Ok(());
    }
    write_control(&control, &format!("+{controller}"))
}

fn write_control(path: &Path, value: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// Removes empty `colony-<pid>` groups left by daemons that are gone.
fn cleanup_stale_groups(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten().take(MAX_STALE_GROUPS * 16) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("colony-")).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(children) = fs::read_dir(&dir) {
            for child in children.flatten().take(MAX_STALE_GROUPS) {
                if child.path().is_dir() {
                    let _ = fs::remove_dir(child.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// Kills everything in a cgroup (best effort).
fn kill_cgroup(dir: &Path) {
    if write_control(&dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // Kernels before 5.14 have no cgroup.kill: signal each member.
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let _ = signal_pid(pid, libc::SIGKILL);
        }
    }
}

#[allow(unsafe_code)]
fn signal_pid(pid: u32, signal: i32) -> io::Result<()> {
    let Ok(pid) = i32::try_from(pid) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    if pid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill has no memory-safety preconditions; `pid` is positive.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One task's cgroup.
#[derive(Debug)]
struct TaskCgroup {
    dir: PathBuf,
}

impl TaskCgroup {
    fn create(
        parent: &CgroupParent,
        seq: u64,
        task_id: &str,
        memory_bytes: Option<u64>,
        spec: &ProcessSpec,
    ) -> Result<Self, ExecError> {
        let safe: String = task_id
            .chars()
            .take(100)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let dir = parent.dir.join(format!("t{seq}-{safe}"));
        fs::create_dir(&dir).map_err(|source| ExecError::Cgroup { path: dir.clone(), source })?;
        let group = TaskCgroup { dir };
        if let Err(err) = group.configure(parent, memory_bytes, spec) {
            group.remove_now();
            return Err(err);
        }
        Ok(group)
    }

    fn configure(&self, parent: &CgroupParent, memory_bytes: Option<u64>, spec: &ProcessSpec) -> Result<(), ExecError> {
        if let Some(bytes) = memory_bytes {
            let path = self.dir.join("memory.max");
            write_control(&path, &bytes.to_string()).map_err(|source| ExecError::Cgroup { path, source })?;
            // Without swap off the limit could be dodged by swapping; the
            // file is absent when the kernel has no swap accounting.
            let _ = write_control(&self.dir.join("memory.swap.max"), "0");
        }
        if parent.cpu && spec.cpu_millis > 0 {
            // cpu_millis / 1000 cores = quota / period.
            let quota = spec.cpu_millis.saturating_mul(CPU_PERIOD_US / 1000).max(1000);
            let path = self.dir.join("cpu.max");
            write_control(&path, &format!("{quota} {CPU_PERIOD_US}"))
                .map_err(|source| ExecError::Cgroup { path, source })?;
        }
        Ok(())
    }

    fn kill(&self) {
        kill_cgroup(&self.dir);
    }

    fn remove_now(&self) {
        let _ = fs::remove_dir(&self.dir);
    }

    /// Removes the group, retrying while its killed members finish dying.
    async fn remove(self) {
        for _ in 0..CGROUP_REMOVE_ATTEMPTS {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return,
                Err(_) => tokio::time::sleep(CGROUP_REMOVE_PAUSE).await,
            }
        }
        tracing::warn!(cgroup = %self.dir.display(), "could not remove task cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn spec(command: &str, args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            command: command.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..ProcessSpec::default()
        }
    }

    fn driver() -> (tempfile::TempDir, ProcessDriver) {
        let dir = tempfile::tempdir().unwrap();
        let driver = ProcessDriver::new(dir.path().join("logs")).unwrap();
        (dir, driver)
    }

    /// Live (non-zombie) processes whose process group is `pgid`.
    fn live_group_members(pgid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // Fields after the parenthesised command: state ppid pgrp ...
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
                out.push(pid);
            }
        }
        out
    }

    #[tokio::test]
    async fn echo_writes_stdout_log() {
        let (_dir, driver) = driver();
        let p = driver.start("echo-task", &spec("echo", &["hello", "world"])).await.unwrap();
        assert!(p.pid > 0);
        assert_eq!(p.wait().await, ExitOutcome::Exited { code: 0 });
        let (out, err) = driver.log_paths("echo-task");
        assert_eq!(fs::read_to_string(out).unwrap(), "hello world\n");
        assert_eq!(fs::read_to_string(err).unwrap(), "");
    }

    #[tokio::test]
    async fn logs_are_appended_across_runs_and_stderr_is_separate() {
        let (_dir, driver) = driver();
        for word in ["one", "two"] {
            let script = format!("echo {word}; echo err-{word} >&2");
            let p = driver.start("twice", &spec("sh", &["-c", &script])).await.unwrap();
            assert!(p.wait().await.success());
        }
        let (out, err) = driver.log_paths("twice");
        assert_eq!(fs::read_to_string(out).unwrap(), "one\ntwo\n");
        assert_eq!(fs::read_to_string(err).unwrap(), "err-one\nerr-two\n");
    }

    #[tokio::test]
    async fn exit_code_is_recorded() {
        let (_dir, driver) = driver();
        let p = driver.start("exit3", &spec("sh", &["-c", "exit 3"])).await.unwrap();
        let outcome = p.wait().await;
        assert_eq!(outcome, ExitOutcome::Exited { code: 3 });
        assert_eq!(outcome.exit_code(), 3);
        assert!(!outcome.success());
    }

    #[tokio::test]
    async fn kill_stops_the_whole_group() {
        let (_dir, driver) = driver();
        let p = driver.start("group", &spec("sh", &["-c", "sleep 100 & sleep 100"])).await.unwrap();
        let pgid = p.pid;
        // Wait until both sleeps are running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while live_group_members(pgid).len() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let members = live_group_members(pgid);
        assert!(members.len() >= 3, "expected sh and two sleeps, got {members:?}");

        p.kill_handle().kill(Duration::from_secs(2));
        let outcome = tokio::time::timeout(Duration::from_secs(10), p.wait()).await.unwrap();
        assert_eq!(outcome, ExitOutcome::Signaled { signal: libc::SIGTERM });
        assert_eq!(outcome.exit_code(), 128 + libc::SIGTERM);

        let deadline = Instant::now() + Duration::from_secs(5);
        while !live_group_members(pgid).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(live_group_members(pgid), Vec::<u32>::new());
        for pid in members {
            let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(
                state.is_empty() || state.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'),
                "process {pid} still alive: {state}"
            );
        }
    }

    #[tokio::test]
    async fn kill_escalates_to_sigkill_after_grace() {
        let (_dir, driver) = driver();
        let p = driver.start("stubborn", &spec("sh", &["-c", "trap '' TERM; sleep 100"])).await.unwrap();
        // Let the trap be installed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        p.kill_handle().kill(Duration::from_millis(300));
        let outcome = tokio::time::timeout(Duration::from_secs(10), p.wait()).await.unwrap();
        assert_eq!(outcome, ExitOutcome::Signaled { signal: libc::SIGKILL });
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn wait_reaps_background_children() {
        let (_dir, driver) = driver();
        let p = driver.start("leaver", &spec("sh", &["-c", "sleep 100 & echo started"])).await.unwrap();
        let pgid = p.pid;
        assert!(p.wait().await.success());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !live_group_members(pgid).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(live_group_members(pgid), Vec::<u32>::new());
    }

    #[tokio::test]
    async fn kill_after_exit_is_harmless() {
        let (_dir, driver) = driver();
        let p = driver.start("quick", &spec("true", &[])).await.unwrap();
        let handle = p.kill_handle();
        assert!(p.wait().await.success());
        handle.kill(Duration::ZERO);
        handle.kill(Duration::from_millis(10));
    }

    #[tokio::test]
    async fn env_and_workdir_are_honoured() {
        let (dir, driver) = driver();
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let mut s = spec(
            "sh",
            &[
                "-c",
                "echo \"foo=$FOO\"; pwd; printenv CARGO_MANIFEST_DIR || echo absent; \
                 test -n \"$PATH\" && echo has-path",
            ],
        );
        s.env.insert("FOO".into(), "bar baz".into());
        s.workdir = Some(work.clone());
        let p = driver.start("envtask", &s).await.unwrap();
        assert!(p.wait().await.success());
        let out = fs::read_to_string(driver.log_paths("envtask").0).unwrap();
        let expected = format!("foo=bar baz\n{}\nabsent\nhas-path\n", work.display());
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn memory_hog_fails_under_limit() {
        let (_dir, driver) = driver();
        // dd allocates its whole 300 MiB block buffer up front.
        let mut hog = spec("dd", &["if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"]);
        hog.memory_mb = 64;
        let p = driver.start("hog", &hog).await.unwrap();
        let outcome = p.wait().await;
        eprintln!("mechanism {}: hog outcome {outcome:?}", driver.memory_limit_mechanism());
        if driver.memory_limit_mechanism() == "none" {
            eprintln!("no memory-limit mechanism; outcome {outcome:?}");
        } else {
            assert!(!outcome.success(), "hog succeeded: {outcome:?}");
            assert_ne!(outcome.exit_code(), 0);
        }

        // A small program runs fine under the same limit.
        let mut small = spec("sh", &["-c", "echo ok"]);
        small.memory_mb = 64;
        let p = driver.start("small", &small).await.unwrap();
        assert!(p.wait().await.success());

        // And the hog succeeds without a limit.
        hog.memory_mb = 0;
        let p = driver.start("hog-unlimited", &hog).await.unwrap();
        assert!(p.wait().await.success());
    }

    #[tokio::test]
    async fn missing_command_is_a_spawn_error() {
        let (_dir, driver) = driver();
        let err = driver.start("missing", &spec("colony-no-such-command-xyz", &[])).await.unwrap_err();
        assert!(matches!(err, ExecError::Spawn { ref command, .. } if command == "colony-no-such-command-xyz"));
        assert!(err.to_string().contains("colony-no-such-command-xyz"));
    }

    #[tokio::test]
    async fn bad_input_is_rejected() {
        let (dir, driver) = driver();
        for id in ["", "../etc", "a/b", ".hidden", "nul\0x", &"x".repeat(200)] {
            let err = driver.start(id, &spec("true", &[])).await.unwrap_err();
            assert!(matches!(err, ExecError::InvalidTaskId { .. }), "{id:?}: {err}");
        }
        let err = driver.start("t", &spec("", &[])).await.unwrap_err();
        assert!(matches!(err, ExecError::InvalidSpec { .. }));
        let err = driver.start("t", &spec("echo", &["a\0b"])).await.unwrap_err();
        assert!(matches!(err, ExecError::InvalidSpec { .. }));
        let mut s = spec("true", &[]);
        s.env.insert("A=B".into(), "x".into());
        let err = driver.start("t", &s).await.unwrap_err();
        assert!(matches!(err, ExecError::InvalidSpec { .. }));
        let mut s = spec("true", &[]);
        s.workdir = Some(dir.path().join("nope"));
        let err = driver.start("t", &s).await.unwrap_err();
        assert!(matches!(err, ExecError::Workdir { .. }));
    }

    #[test]
    fn kill_process_group_refuses_dangerous_ids() {
        assert!(!kill_process_group(0));
        assert!(!kill_process_group(1));
        assert!(!kill_process_group(u32::MAX));
        assert!(!kill_process_group(std::process::id()));
    }

    #[tokio::test]
    async fn kill_process_group_kills_a_detached_group() {
        let (_dir, driver) = driver();
        let p = driver.start("orphan", &spec("sh", &["-c", "sleep 100 & sleep 100"])).await.unwrap();
        let pgid = p.pid;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(kill_process_group(pgid));
        let outcome = tokio::time::timeout(Duration::from_secs(10), p.wait()).await.unwrap();
        assert_eq!(outcome, ExitOutcome::Signaled { signal: libc::SIGKILL });
    }

    #[test]
    fn log_tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_log_tail(&path, 4).unwrap(), b"6789");
        assert_eq!(read_log_tail(&path, 100).unwrap(), b"0123456789");
        assert_eq!(read_log_tail(&path, 0).unwrap(), b"");
        assert!(read_log_tail(&dir.path().join("missing"), 4).is_err());
    }

    #[test]
    fn cgroup_detection_falls_back_cleanly_on_a_non_cgroup_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(detect_cgroup_v2(dir.path()).is_none());
        fs::write(dir.path().join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        // A plain directory accepts the root's "+memory" write, but the group
        // created under it has no control files, so detection must give up
        // and remove what it made.
        assert!(detect_cgroup_v2(dir.path()).is_none());
        let leftovers: Vec<_> =
            fs::read_dir(dir.path()).unwrap().flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name()).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn exit_outcome_serde_and_codes() {
        let json = serde_json::to_string(&ExitOutcome::Exited { code: 3 }).unwrap();
        assert_eq!(json, r#"{"kind":"exited","code":3}"#);
        let back: ExitOutcome = serde_json::from_str(r#"{"kind":"signaled","signal":9}"#).unwrap();
        assert_eq!(back, ExitOutcome::Signaled { signal: 9 });
        let spec: ProcessSpec = serde_json::from_str(r#"{"command":"echo"}"#).unwrap();
        assert_eq!(spec.command, "echo");
        assert_eq!(spec.memory_mb, 0);
        assert_eq!(ExitOutcome::Signaled { signal: 9 }.exit_code(), 137);
        assert!(ExitOutcome::Exited { code: 0 }.success());
        assert!(!ExitOutcome::Signaled { signal: 9 }.success());
        assert_eq!(ExitOutcome::Unknown.exit_code(), -1);
    }
}
