//! Task drivers: what runs an instance once the node core says `StartTask`.
//!
//! - [`Driver`]: the trait for in-process work (a future per task), with the closure adapter
//!   [`driver_fn`].
//! - [`ExecDriver`]: child processes, through the [`ProcessDriver`].
//!   It is registered under the name `exec` on every node. While a process runs, its process
//!   group id is kept in `<tasks dir>/<task>.pgid`, so a daemon that crashed can kill the
//!   leftovers when it starts again ([`kill_leftover_tasks`]).
//!
//! Task ids of the node core look like `<job>/<index>/<attempt>`; file names use
//! `<job>.<index>.<attempt>` ([`file_id`]).

use super::exec::{self, KillHandle, ProcessDriver, ProcessSpec};
use super::protocol::{TaskLogs, MAX_LOG_TAIL_BYTES};
use colony_crdt::JobSpec;
use futures::future::{BoxFuture, FutureExt};
use std::fs;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Exit code reported for a task whose future panicked (Rust's own panic exit code).
pub const PANIC_EXIT_CODE: i32 = 101;
/// Exit code reported for a task that ignored its cancellation past the grace period and was
/// dropped (as if killed by `SIGKILL`).
pub const KILLED_EXIT_CODE: i32 = 128 + 9;
/// Exit code an [`ExecDriver`] used through the [`Driver`] trait reports when its process
/// could not be started (as a shell does for a missing command).
pub const START_FAILED_EXIT_CODE: i32 = 127;

/// Tells a running task that it should stop. Cheap to clone.
///
/// The runtime cancels a task when the node core stops it (the job was stopped, another node
/// won the instance, the node drains or leaves). The task should then return soon; after the
/// node's stop grace period (5 s by default) its future is dropped.
#[derive(Debug, Clone)]
pub struct CancelToken {
    rx: watch::Receiver<bool>,
}

/// The sending side of a [`CancelToken`].
#[derive(Debug)]
pub struct Canceller {
    tx: watch::Sender<bool>,
}

impl CancelToken {
    /// A new token and the [`Canceller`] that trips it (useful to test a [`Driver`]).
    pub fn new() -> (Canceller, CancelToken) {
        let (tx, rx) = watch::channel(false);
        (Canceller { tx }, CancelToken { rx })
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once cancellation is requested (or the canceller is gone, which only happens
    /// when the whole node is torn down).
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}

impl Canceller {
    /// Requests cancellation. Idempotent.
    pub fn cancel(&self) {
        let _ = self.tx.send(true);
    }
}

/// Everything a [`Driver`] gets about the task to run.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task id, `<job>/<index>/<attempt>`.
    pub task: String,
    /// The id of the node running it.
    pub node: String,
    /// The job id.
    pub job: String,
    /// The instance index.
    pub index: u32,
    /// The attempt number.
    pub attempt: u32,
    /// The job's spec (its `command`, `args` and `env` are the driver's to interpret).
    pub spec: JobSpec,
    /// Trips when the task must stop.
    pub cancel: CancelToken,
}

/// Runs tasks of jobs whose `spec.driver` names it.
///
/// The future's output is the task's exit code: 0 is success, anything else a failure (which
/// the job's restart policy may retry). A panic inside the future is caught and reported as
/// exit code [`PANIC_EXIT_CODE`]. Dropping the node without shutting it down drops running
/// futures mid-flight, as a crash would.
pub trait Driver: Send + Sync + 'static {
    /// Starts one task. Called on the node's tokio runtime; must not block.
    fn run(&self, task: TaskContext) -> BoxFuture<'static, i32>;
}

/// A [`Driver`] made from a closure; see [`driver_fn`].
pub struct FnDriver<F> {
    f: F,
}

impl<F> std::fmt::Debug for FnDriver<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnDriver").finish_non_exhaustive()
    }
}

/// Makes a [`Driver`] from an async closure:
///
/// ```no_run
/// let hello = colony::driver_fn(|ctx: colony::TaskContext| async move {
///     println!("running {}", ctx.task);
///     0
/// });
/// ```
pub fn driver_fn<F, Fut>(f: F) -> FnDriver<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = i32> + Send + 'static,
{
    FnDriver { f }
}

impl<F, Fut> Driver for FnDriver<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = i32> + Send + 'static,
{
    fn run(&self, task: TaskContext) -> BoxFuture<'static, i32> {
        (self.f)(task).boxed()
    }
}

/// How a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskOutcome {
    /// It ran and ended with this exit code.
    Exited(i32),
    /// It never started.
    StartFailed(String),
}

/// Runs an in-process driver's task: cancellation with a grace period, panics caught.
pub(crate) fn supervise(driver: Arc<dyn Driver>, ctx: TaskContext, grace: Duration) -> BoxFuture<'static, TaskOutcome> {
    let cancel = ctx.cancel.clone();
    let task = ctx.task.clone();
    async move {
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| driver.run(ctx))) {
            Ok(fut) => fut,
            Err(_) => {
                tracing::warn!(task, "driver panicked while starting the task");
                return TaskOutcome::Exited(PANIC_EXIT_CODE);
            }
        };
        let mut fut = AssertUnwindSafe(fut).catch_unwind();
        let result = tokio::select! {
            r = &mut fut => Some(r),
            () = cancel.cancelled() => tokio::time::timeout(grace, &mut fut).await.ok(),
        };
        let code = match result {
            Some(Ok(code)) => code,
            Some(Err(_)) => {
                tracing::warn!(task, "task panicked");
                PANIC_EXIT_CODE
            }
            None => {
                tracing::warn!(task, grace_ms = grace.as_millis() as u64, "task ignored cancellation; dropped");
                KILLED_EXIT_CODE
            }
        };
        TaskOutcome::Exited(code)
    }
    .boxed()
}

/// The file-name form of a task id: `<job>.<index>.<attempt>`.
pub fn file_id(task: &str) -> String {
    task.replace('/', ".")
}

/// Runs jobs as child processes (the `exec` driver).
///
/// `command`, `args` and `env` come from the spec; `workdir` defaults to the node's data
/// directory; `resources.memory_mb` and `resources.cpu_millis` become limits where the
/// machine supports them (see [`exec`]). Stopping a task sends `SIGTERM` to its
/// process group and `SIGKILL` after the grace period.
#[derive(Debug, Clone)]
pub struct ExecDriver {
    process: ProcessDriver,
    tasks_dir: PathBuf,
    workdir: PathBuf,
    grace: Duration,
}

impl ExecDriver {
    /// A driver writing logs to `log_dir`, pid files to `tasks_dir`, running commands in
    /// `workdir` unless their spec names another, with `grace` between `SIGTERM` and `SIGKILL`.
    pub fn new(
        log_dir: PathBuf,
        tasks_dir: PathBuf,
        workdir: PathBuf,
        grace: Duration,
    ) -> Result<ExecDriver, exec::ExecError> {
        let process = ProcessDriver::new(log_dir)?;
        fs::create_dir_all(&tasks_dir).map_err(|source| exec::ExecError::LogDir { path: tasks_dir.clone(), source })?;
        Ok(ExecDriver { process, tasks_dir, workdir, grace })
    }

    /// The underlying process driver.
    pub fn process_driver(&self) -> &ProcessDriver {
        &self.process
    }

    fn process_spec(&self, spec: &JobSpec) -> ProcessSpec {
        ProcessSpec {
            command: spec.command.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            workdir: Some(spec.workdir.as_ref().map_or_else(|| self.workdir.clone(), PathBuf::from)),
            memory_mb: spec.resources.memory_mb,
            cpu_millis: spec.resources.cpu_millis,
        }
    }

    /// Starts a task and supervises it to its end.
    pub(crate) fn start_task(
        &self,
        task: &str,
        spec: &JobSpec,
        cancel: CancelToken,
    ) -> BoxFuture<'static, TaskOutcome> {
        let this = self.clone();
        let id = file_id(task);
        let pspec = self.process_spec(spec);
        async move {
            let process = match this.process.start(&id, &pspec).await {
                Ok(p) => p,
                Err(e) => {
                    // Leave the reason where `logs` finds it.
                    let (_, stderr) = this.process.log_paths(&id);
                    if !id.starts_with('.') && !id.contains('/') {
                        let _ = append_line(&stderr, &format!("colony: cannot start task: {e}"));
                    }
                    return TaskOutcome::StartFailed(e.to_string());
                }
            };
            let pid_file = PidFile::create(&this.tasks_dir, &id, process.pid);
            let kill = process.kill_handle();
            // Until the process is reaped, dropping this future (a crash of the node) kills it.
            let _kill_on_drop = KillOnDrop(kill.clone());
            let wait = process.wait();
            tokio::pin!(wait);
            let outcome = tokio::select! {
                o = &mut wait => o,
                () = cancel.cancelled() => {
                    kill.kill(this.grace);
                    wait.await
                }
            };
            drop(pid_file);
            TaskOutcome::Exited(outcome.exit_code())
        }
        .boxed()
    }
}

impl Driver for ExecDriver {
    fn run(&self, task: TaskContext) -> BoxFuture<'static, i32> {
        self.start_task(&task.task, &task.spec, task.cancel)
            .map(|outcome| match outcome {
                TaskOutcome::Exited(code) => code,
                TaskOutcome::StartFailed(_) => START_FAILED_EXIT_CODE,
            })
            .boxed()
    }
}

fn append_line(path: &Path, line: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")
}

struct KillOnDrop(KillHandle);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // A no-op once the process was reaped.
        self.0.kill(Duration::ZERO);
    }
}

/// `<tasks dir>/<task>.pgid` while the task's process runs: `"<pgid> <start time>"`, the start
/// time being field 22 of `/proc/<pgid>/stat` (it tells a reused pid from ours).
struct PidFile {
    path: PathBuf,
}

impl PidFile {
    fn create(dir: &Path, id: &str, pgid: u32) -> Option<PidFile> {
        let path = dir.join(format!("{id}.pgid"));
        let start = process_start_time(pgid).unwrap_or_default();
        // Not fsync'd: after a machine crash the processes are gone anyway.
        match fs::write(&path, format!("{pgid} {start}\n")) {
            Ok(()) => Some(PidFile { path }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write task pid file");
                None
            }
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command start at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// Kills the process groups recorded in `<tasks_dir>/*.pgid` by an earlier run of the daemon
/// and deletes the files. A group whose leader pid now belongs to another process (a
/// different start time) is left alone. Returns how many groups were signalled.
pub fn kill_leftover_tasks(tasks_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(tasks_dir) else { return 0 };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pgid") {
            continue;
        }
        let content = fs::read_to_string(&path).unwrap_or_default();
        let mut fields = content.split_whitespace();
        let pgid = fields.next().and_then(|p| p.parse::<u32>().ok());
        let recorded_start = fields.next().unwrap_or("");
        if let Some(pgid) = pgid {
            let reused = match process_start_time(pgid) {
                Some(now) => !recorded_start.is_empty() && now != recorded_start,
                None => false, // leader gone; members of its group may remain
            };
            if reused {
                tracing::info!(pgid, file = %path.display(), "pid of a leftover task was reused; not killing");
            } else if exec::kill_process_group(pgid) {
                killed += 1;
                tracing::info!(pgid, file = %path.display(), "killed a task left over from a previous run");
            }
        }
        let _ = fs::remove_file(&path);
    }
    killed
}

/// The log tails of the newest task under `log_dir` whose id starts with `task_prefix`
/// (`"<job>/<index>/"`), by attempt number. `Ok(None)` when there is none.
pub fn read_task_logs(log_dir: &Path, task_prefix: &str, max_bytes: u64) -> io::Result<Option<TaskLogs>> {
    if task_prefix.is_empty()
        || task_prefix.len() > 512
        || task_prefix.starts_with('.')
        || task_prefix.contains('\\')
        || task_prefix.chars().any(char::is_control)
    {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad task prefix"));
    }
    let prefix = file_id(task_prefix);
    let entries = match fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut best: Option<(u32, String)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(id) = name.strip_suffix(".stdout").or_else(|| name.strip_suffix(".stderr")) else { continue };
        let Some(rest) = id.strip_prefix(&prefix) else { continue };
        let Ok(attempt) = rest.parse::<u32>() else { continue };
        if best.as_ref().is_none_or(|(a, _)| attempt > *a) {
            best = Some((attempt, id.to_string()));
        }
    }
    let Some((attempt, id)) = best else { return Ok(None) };
    let max = max_bytes.min(MAX_LOG_TAIL_BYTES);
    let tail = |suffix: &str| match exec::read_log_tail(&log_dir.join(format!("{id}.{suffix}")), max) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    let task = format!("{}{attempt}", task_prefix);
    Ok(Some(TaskLogs { task, stdout: tail("stdout")?, stderr: tail("stderr")? }))
}

/// Removes the log files under `log_dir` of jobs not in `keep`, when they were last written
/// more than `min_age` ago. Returns how many files were removed.
pub fn remove_stale_logs(log_dir: &Path, keep: &std::collections::HashSet<String>, min_age: Duration) -> usize {
    let Ok(entries) = fs::read_dir(log_dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.ends_with(".stdout") || name.ends_with(".stderr")) {
            continue;
        }
        let Some(job) = name.split('.').next() else { continue };
        if keep.contains(job) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_attempt_is_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("j1.0.0.stdout"), "old").unwrap();
        fs::write(dir.path().join("j1.0.2.stdout"), "new").unwrap();
        fs::write(dir.path().join("j1.0.2.stderr"), "err").unwrap();
        fs::write(dir.path().join("j1.1.5.stdout"), "other index").unwrap();
        fs::write(dir.path().join("j1.0.10x.stdout"), "junk").unwrap();
        let logs = read_task_logs(dir.path(), "j1/0/", 100).unwrap().unwrap();
        assert_eq!(logs.task, "j1/0/2");
        assert_eq!(logs.stdout, b"new");
        assert_eq!(logs.stderr, b"err");
        assert_eq!(read_task_logs(dir.path(), "j1/0/", 2).unwrap().unwrap().stdout, b"ew");
        assert!(read_task_logs(dir.path(), "j2/0/", 100).unwrap().is_none());
        assert!(read_task_logs(&dir.path().join("none"), "j1/0/", 100).unwrap().is_none());
        assert!(read_task_logs(dir.path(), "../x", 100).is_err());
        assert!(read_task_logs(dir.path(), "", 100).is_err());
    }

    #[test]
    fn logs_of_forgotten_jobs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["kept.0.0.stdout", "gone.0.0.stdout", "gone.0.0.stderr", "other.txt"] {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        let keep: std::collections::HashSet<String> = ["kept".to_string()].into();
        assert_eq!(remove_stale_logs(dir.path(), &keep, Duration::from_secs(3600)), 0, "too young");
        assert_eq!(remove_stale_logs(dir.path(), &keep, Duration::ZERO), 2);
        let mut left: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, vec!["kept.0.0.stdout".to_string(), "other.txt".to_string()]);
    }

    #[test]
    fn leftover_groups_are_killed_and_files_removed() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep").arg("100").process_group(0).spawn().unwrap();
        let pgid = child.id();
        let start = process_start_time(pgid).unwrap();
        fs::write(dir.path().join("j.0.0.pgid"), format!("{pgid} {start}\n")).unwrap();
        // A reused pid (start time differs) is left alone.
        let mut other = std::process::Command::new("sleep").arg("100").process_group(0).spawn().unwrap();
        fs::write(dir.path().join("k.0.0.pgid"), format!("{} 1\n", other.id())).unwrap();
        fs::write(dir.path().join("garbage.pgid"), "not a pid").unwrap();
        assert_eq!(kill_leftover_tasks(dir.path()), 1);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(other.try_wait().unwrap().is_none(), "an unrelated process was killed");
        other.kill().unwrap();
        let _ = other.wait();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn in_process_tasks_are_cancelled_with_grace_and_panics_caught() {
        let (canceller, cancel) = CancelToken::new();
        let ctx = TaskContext {
            task: "j/0/0".into(),
            node: "n".into(),
            job: "j".into(),
            index: 0,
            attempt: 0,
            spec: JobSpec::command("x", Vec::<String>::new()),
            cancel,
        };
        let polite: Arc<dyn Driver> = Arc::new(driver_fn(|ctx: TaskContext| async move {
            ctx.cancel.cancelled().await;
            7
        }));
        let fut = supervise(polite, ctx.clone(), Duration::from_secs(5));
        canceller.cancel();
        assert_eq!(fut.await, TaskOutcome::Exited(7));

        let stubborn: Arc<dyn Driver> = Arc::new(driver_fn(|_ctx| futures::future::pending::<i32>()));
        let fut = supervise(stubborn, ctx.clone(), Duration::from_millis(50));
        assert_eq!(fut.await, TaskOutcome::Exited(KILLED_EXIT_CODE));

        let (_c, cancel) = CancelToken::new();
        let ctx = TaskContext { cancel, ..ctx };
        fn boom() -> i32 {
            panic!("boom")
        }
        let panicky: Arc<dyn Driver> = Arc::new(driver_fn(|_ctx| async move { boom() }));
        assert_eq!(supervise(panicky, ctx, Duration::from_secs(1)).await, TaskOutcome::Exited(PANIC_EXIT_CODE));
    }
}
