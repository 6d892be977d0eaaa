//! Embedded nodes in one process, joined over real libp2p sockets on 127.0.0.1 (mDNS off).
//!
//! Every wait is a poll with a deadline (every 50 ms, up to 20 s), never a bare sleep.

use colony::engine::Event;
use colony::{driver_fn, ClusterKey, Error, JobSpec, Node, NodeBuilder, TaskContext, Timing};
use colony_crdt::{Constraint, ConstraintOp, InstanceStatus, JobKind, JobStatus, NodeState};
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `DEADLINE`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(t) = check().await {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fast_timing() -> Timing {
    Timing {
        probe_interval_ms: 100,
        probe_timeout_ms: 80,
        suspicion_ms: 300,
        anti_entropy_ms: 200,
        // Debug builds on a loaded machine take tens of ms per hop: keep claims apart.
        settle_ms: 100,
        claim_stagger_ms: 100,
        ..Timing::default()
    }
}

fn builder(name: &str) -> NodeBuilder {
    Node::builder()
        .name(name)
        .in_memory()
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .mdns(false)
        .timing(fast_timing())
        .cpu_millis(4_000)
        .memory_mb(4_096)
        .stop_grace(Duration::from_secs(2))
        .driver("ok", driver_fn(|_ctx: TaskContext| async move { 0 }))
}

fn in_process(driver: &str, kind: JobKind) -> JobSpec {
    let mut spec = JobSpec::command("in-process", Vec::<String>::new());
    spec.name = format!("{driver}-job");
    spec.driver = driver.to_string();
    spec.kind = kind;
    spec
}

async fn all_alive(nodes: &[&Node], n: usize) -> Option<()> {
    for node in nodes {
        let seen = node.nodes().await.ok()?;
        if seen.len() != n || seen.iter().any(|x| x.state != NodeState::Alive) {
            return None;
        }
    }
    Some(())
}

async fn full_mesh(nodes: &[&Node]) -> Option<()> {
    for node in nodes {
        if node.health().await.ok()?.peers != nodes.len() - 1 {
            return None;
        }
    }
    Some(())
}

async fn status_on(node: &Node, id: &str) -> Option<JobStatus> {
    node.job(id).await.ok().map(|j| j.status)
}

async fn three_nodes(extra: impl Fn(&str, NodeBuilder) -> NodeBuilder) -> Vec<Node> {
    let a = extra("a", builder("a")).start().await.expect("start a");
    let seed = a.listen_addrs()[0].clone();
    let b = extra("b", builder("b").seed(seed.clone())).start().await.expect("start b");
    let c = extra("c", builder("c").seed(seed)).start().await.expect("start c");
    let all = [&a, &b, &c];
    eventually("three nodes alive everywhere", || all_alive(&all, 3)).await;
    vec![a, b, c]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_once_and_is_seen_everywhere() {
    init_tracing();
    let nodes = three_nodes(|_, b| b).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    assert_ne!(a.id(), b.id());
    assert_eq!(b.name(), "b");

    let mut events = b.events();
    let id = b.submit(in_process("ok", JobKind::Batch)).await.expect("submit");
    for node in [a, b, c] {
        eventually("the job succeeded on every node", || async {
            (status_on(node, &id).await == Some(JobStatus::Succeeded)).then_some(())
        })
        .await;
    }
    let job = c.job(&id).await.unwrap();
    assert_eq!(job.instances.len(), 1);
    assert_eq!(job.instances[0].status, InstanceStatus::Succeeded);
    assert_eq!(job.duplicate_runs, 0);
    assert!(job.instances[0].runs.iter().any(|r| r.exit_code == Some(0)));

    // The submitting node published the state changes.
    let mut seen_running = false;
    let saw = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = events.next().await {
            match event {
                Event::Instance { job, status: InstanceStatus::Running, node, .. } if job == id => {
                    assert!(node.is_some());
                    seen_running = true;
                }
                Event::Job { id: job, status: JobStatus::Succeeded } if job == id => return true,
                _ => {}
            }
        }
        false
    })
    .await;
    assert_eq!(saw, Ok(true), "no `succeeded` event");
    assert!(seen_running, "no `running` instance event before success");

    // The tables converge (I1).
    eventually("equal digests", || async {
        let mut digests = Vec::new();
        for node in [a, b, c] {
            digests.push(node.health().await.ok()?.digest);
        }
        digests.windows(2).all(|w| w[0] == w[1]).then_some(())
    })
    .await;

    // Errors are typed.
    assert!(matches!(a.job("no-such-job").await, Err(Error::NotFound(_))));
    assert!(matches!(a.stop("no-such-job").await, Err(Error::NotFound(_))));
    let mut bad = in_process("ok", JobKind::Batch);
    bad.count = 0;
    match a.submit(bad).await {
        Err(Error::InvalidSpec { field, .. }) => assert_eq!(field, "count"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }

    let metrics = a.metrics().await.unwrap();
    assert!(metrics.contains("colony_jobs{status=\"succeeded\"} 1"), "{metrics}");
    assert!(metrics.contains("colony_peers 2"), "{metrics}");
    assert!(metrics.contains("colony_tasks_superseded_total"), "{metrics}");
    let health = a.health().await.unwrap();
    assert!(health.ok);
    assert_eq!(health.jobs, 1);

    for node in &nodes {
        node.shutdown().await;
    }
    assert!(matches!(a.jobs().await, Err(Error::Shutdown)));
    assert!(a.events().next().await.is_none(), "the event stream ends after shutdown");
}

/// Counts live task futures per node: the guard inside each future decrements on drop.
struct Live(Arc<AtomicUsize>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_service_moves_elsewhere() {
    init_tracing();
    let live: Arc<Mutex<HashMap<String, Arc<AtomicUsize>>>> = Arc::default();
    let live2 = live.clone();
    let mut nodes = three_nodes(move |name, b| {
        let counter = Arc::new(AtomicUsize::new(0));
        live2.lock().unwrap().insert(name.to_string(), counter.clone());
        b.driver(
            "service",
            driver_fn(move |ctx: TaskContext| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _live = Live(counter);
                    ctx.cancel.cancelled().await;
                    0
                }
            }),
        )
    })
    .await;
    let refs: Vec<&Node> = nodes.iter().collect();
    eventually("a full mesh", || full_mesh(&refs)).await;

    let id = nodes[0].submit(in_process("service", JobKind::Service)).await.unwrap();
    let runner = eventually("the service running", || async {
        let job = nodes[0].job(&id).await.ok()?;
        let inst = &job.instances[0];
        (inst.status == InstanceStatus::Running).then(|| inst.node_id.clone()).flatten()
    })
    .await;
    let pos = nodes.iter().position(|n| n.id() == runner).expect("runner is one of ours");
    let name = nodes[pos].name().to_string();
    let counter = live.lock().unwrap()[&name].clone();
    eventually("the runner's future to be live", || async { (counter.load(Ordering::SeqCst) == 1).then_some(()) })
        .await;

    // Crash: drop the only handle without shutdown.
    let crashed = nodes.remove(pos);
    let crashed_id = crashed.id().to_string();
    drop(crashed);
    eventually("the crashed node's work to be dropped", || async {
        (counter.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;

    let survivor = &nodes[0];
    let new_runner = eventually("the service to run on a survivor", || async {
        let job = survivor.job(&id).await.ok()?;
        let inst = &job.instances[0];
        let owner = inst.node_id.clone()?;
        (inst.status == InstanceStatus::Running && owner != crashed_id).then_some(owner)
    })
    .await;
    assert!(nodes.iter().any(|n| n.id() == new_runner));
    eventually("the crashed node declared dead", || async {
        let seen = survivor.nodes().await.ok()?;
        seen.iter().any(|n| n.id == crashed_id && n.state == NodeState::Dead).then_some(())
    })
    .await;
    // Exactly one copy runs among the survivors.
    eventually("one live copy", || async {
        let total: usize = live.lock().unwrap().values().map(|c| c.load(Ordering::SeqCst)).sum();
        (total == 1).then_some(())
    })
    .await;

    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_cluster_keys_never_meet() {
    init_tracing();
    let key = ClusterKey::generate();
    let a = builder("a").cluster_key(key).start().await.unwrap();
    let seed = a.listen_addrs()[0].clone();
    let stranger = builder("stranger").cluster_key(ClusterKey::generate()).seed(seed.clone()).start().await.unwrap();
    let keyless = builder("keyless").seed(seed.clone()).start().await.unwrap();
    // A control: the same seed works for a node with the right key.
    let friend = builder("friend").cluster_key(key).seed(seed).start().await.unwrap();
    let pair = [&a, &friend];
    eventually("the friend joins", || all_alive(&pair, 2)).await;

    // Watch for a while (the seeds are re-dialled meanwhile): nobody else ever shows up.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for outsider in [&stranger, &keyless] {
            assert_eq!(outsider.nodes().await.unwrap().len(), 1, "{} saw someone", outsider.name());
            assert_eq!(outsider.health().await.unwrap().peers, 0);
        }
        let names: Vec<String> = a.nodes().await.unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, vec!["a".to_string(), "friend".to_string()]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in [a, stranger, keyless, friend] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_logs_are_fetched_across_the_mesh() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let a = builder("a").data_dir(dir.path()).label("role", "exec").start().await.unwrap();
    let b = builder("b").seed(a.listen_addrs()[0].clone()).start().await.unwrap();
    let pair = [&a, &b];
    eventually("two nodes", || all_alive(&pair, 2)).await;

    let mut spec = JobSpec::command("sh", ["-c", "echo hi; echo oops >&2"]);
    spec.constraints.push(Constraint { label: "role".into(), op: ConstraintOp::Eq, value: "exec".into() });
    let id = b.submit(spec).await.unwrap();
    eventually("the exec job succeeded", || async {
        (status_on(&b, &id).await == Some(JobStatus::Succeeded)).then_some(())
    })
    .await;

    let remote = b.logs(&id, None).await.expect("logs over the mesh");
    assert_eq!(remote.node, a.id());
    assert_eq!(remote.task, format!("{id}/0/0"));
    assert!(remote.stdout.contains("hi"), "{remote:?}");
    assert!(remote.stderr.contains("oops"), "{remote:?}");
    let local = a.logs(&id, Some(0)).await.expect("local logs");
    assert_eq!(local, remote);
    assert!(matches!(b.logs(&id, Some(3)).await, Err(Error::NotFound(_))));
    assert!(matches!(b.logs("nope", None).await, Err(Error::NotFound(_))));

    // A failing command's reason is in its logs too.
    let mut spec = JobSpec::command("colony-no-such-command", Vec::<String>::new());
    spec.restart.attempts = 1;
    spec.constraints.push(Constraint { label: "role".into(), op: ConstraintOp::Eq, value: "exec".into() });
    let id = a.submit(spec).await.unwrap();
    eventually("the bad command failed", || async {
        (status_on(&b, &id).await == Some(JobStatus::Failed)).then_some(())
    })
    .await;
    let logs = b.logs(&id, None).await.unwrap();
    assert!(logs.stderr.contains("cannot start"), "{logs:?}");

    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_acknowledged_jobs() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let start = || builder("solo").data_dir(dir.path()).start();

    let node = start().await.unwrap();
    let node_id = node.id().to_string();
    let done = node.submit(in_process("ok", JobKind::Batch)).await.unwrap();
    // Never placeable: stays pending across restarts.
    let mut waiting = in_process("ok", JobKind::Batch);
    waiting.constraints.push(Constraint { label: "gpu".into(), op: ConstraintOp::Exists, value: String::new() });
    let pending = node.submit(waiting).await.unwrap();
    eventually("the first job succeeded", || async {
        (status_on(&node, &done).await == Some(JobStatus::Succeeded)).then_some(())
    })
    .await;

    // A graceful restart.
    node.shutdown().await;
    let node = start().await.unwrap();
    assert_eq!(node.id(), node_id, "the identity survives a restart");
    assert_eq!(status_on(&node, &done).await, Some(JobStatus::Succeeded));
    assert_eq!(status_on(&node, &pending).await, Some(JobStatus::Pending));

    // A crash right after an acknowledgement: the job is still there.
    let acked = node.submit(in_process("ok", JobKind::Batch)).await.unwrap();
    drop(node);
    let node = start().await.unwrap();
    assert_eq!(node.id(), node_id);
    assert!(node.job(&acked).await.is_ok(), "an acknowledged job was lost");
    assert_eq!(status_on(&node, &pending).await, Some(JobStatus::Pending));
    eventually("the acknowledged job ran", || async {
        (status_on(&node, &acked).await == Some(JobStatus::Succeeded)).then_some(())
    })
    .await;
    assert_eq!(node.jobs().await.unwrap().len(), 3);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_exec_task_is_killed_and_a_stopped_one_ends() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pid");
    let node = builder("solo").data_dir(dir.path().join("data")).start().await.unwrap();
    let mut spec = JobSpec::command("sh", ["-c", &format!("echo $$ > {}; exec sleep 1000", marker.display())]);
    spec.kind = JobKind::Service;
    let id = node.submit(spec).await.unwrap();
    let pid: i32 =
        eventually("the process to start", || async { std::fs::read_to_string(&marker).ok()?.trim().parse().ok() })
            .await;
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid));

    // Dropping the node kills its processes.
    drop(node);
    eventually("the process to die", || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))).then_some(())
    })
    .await;

    // After the restart the service runs again (the old run is lost), and stop ends it.
    let _ = std::fs::remove_file(&marker);
    let node = builder("solo").data_dir(dir.path().join("data")).start().await.unwrap();
    let pid2: i32 =
        eventually("the service to run again", || async { std::fs::read_to_string(&marker).ok()?.trim().parse().ok() })
            .await;
    assert_ne!(pid, pid2);
    node.stop(&id).await.unwrap();
    eventually("the job stopped", || async { (status_on(&node, &id).await == Some(JobStatus::Stopped)).then_some(()) })
        .await;
    assert!(!alive(pid2) || std::fs::read_to_string(format!("/proc/{pid2}/stat")).unwrap_or_default().contains(") Z"));
    assert_eq!(node.running_tasks().await.unwrap(), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_only_where_their_driver_is() {
    init_tracing();
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let ran2 = ran.clone();
    let has = builder("has")
        .driver(
            "only-here",
            driver_fn(move |ctx: TaskContext| {
                let ran = ran2.clone();
                async move {
                    ran.lock().unwrap().push(ctx.node.clone());
                    0
                }
            }),
        )
        .start()
        .await
        .unwrap();
    let lacks = builder("lacks").seed(has.listen_addrs()[0].clone()).start().await.unwrap();
    let pair = [&has, &lacks];
    eventually("two nodes", || all_alive(&pair, 2)).await;
    eventually("a full mesh", || full_mesh(&pair)).await;

    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(lacks.submit(in_process("only-here", JobKind::Batch)).await.unwrap());
    }
    for id in &ids {
        eventually("the job succeeded", || async {
            (status_on(&lacks, id).await == Some(JobStatus::Succeeded)).then_some(())
        })
        .await;
        let job = lacks.job(id).await.unwrap();
        for inst in &job.instances {
            assert_eq!(inst.node_id.as_deref(), Some(has.id()), "{job:?}");
            for run in &inst.runs {
                assert_eq!(run.node_id, has.id(), "a run on the node without the driver: {job:?}");
                assert_eq!(run.exit_code, Some(0), "{job:?}");
            }
            assert_eq!(inst.failures, 0, "{job:?}");
        }
    }
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), 10);
    assert!(ran.iter().all(|n| n == has.id()));
    let stats = lacks.io_stats().await.unwrap();
    assert_eq!(stats.tasks_started, 0);
    assert_eq!(stats.tasks_start_failed, 0, "the node without the driver tried to start work");

    lacks.shutdown().await;
    has.shutdown().await;
}
