//! Real `colony agent` processes on test hosts in Linux network namespaces, joined by mDNS
//! alone (no `--seed`): discovery, a crashed node, an isolated node, a 2|3 split and a paused
//! agent.
//!
//! These tests need root, `ip`, `nsenter` and (for cuts) `iptables`. Without them they print
//! `skipping ...` and pass, unless `COLONY_REQUIRE_ROOT_TESTS=1` (CI), where they fail. They
//! run one at a time (a global lock); each removes every namespace, link, rule and process it
//! made, also when it fails. Every wait polls a condition with a generous deadline; nothing
//! asserts on timing.

#[path = "common/netns.rs"]
mod netns;

use netns::{batch, instances, running_owners, serialize, sleep_processes, sleep_service, Cluster};
use std::time::{Duration, Instant};

/// A `sleep` argument unique to this run and test, so its processes can be counted in /proc.
fn unique_sleep_arg(test_no: u8) -> String {
    format!("1000.{}{test_no}", std::process::id())
}

/// Hosts (by index) of the live `sleep <arg>` processes, sorted; `None` if one is outside
/// every test host.
fn process_hosts(cluster: &Cluster, arg: &str) -> Option<Vec<usize>> {
    let mut hosts: Vec<usize> =
        sleep_processes(arg).iter().map(|p| p.netns.and_then(|ns| cluster.host_of_netns(ns))).collect::<Option<_>>()?;
    hosts.sort_unstable();
    Some(hosts)
}

/// Host `observer`'s owners (as host indices, sorted) of a job whose instances all run.
fn owner_hosts(cluster: &Cluster, observer: usize, job: &str) -> Option<Vec<usize>> {
    let owners = running_owners(&cluster.job(observer, job)?)?;
    let mut hosts: Vec<usize> = owners.iter().map(|id| cluster.host_of(id)).collect::<Option<_>>()?;
    hosts.sort_unstable();
    Some(hosts)
}

/// Whether all `observers` agree that every instance of `job` runs, on the same owners.
fn agreed_owners(cluster: &Cluster, observers: &[usize], job: &str) -> Option<Vec<usize>> {
    let first = owner_hosts(cluster, observers[0], job)?;
    observers[1..].iter().all(|&o| owner_hosts(cluster, o, job).as_ref() == Some(&first)).then_some(first)
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// Three hosts with mDNS as their only discovery each see the other two alive.
#[test]
fn mdns_alone_joins_three_hosts() {
    let _serial = serialize();
    if !netns::can_run("mdns_alone_joins_three_hosts", 1, false) {
        return;
    }
    let mut cluster = Cluster::new(1, 3);
    cluster.start_all();
    let hosts = all(3);
    cluster.wait_until("every host to see all three nodes alive (mDNS only, no --seed)", None, |c| {
        c.all_see(&hosts, &hosts, "alive") && hosts.iter().all(|&i| c.node_states(i).is_some_and(|s| s.len() == 3))
    });
}

/// `kill -9` of the node running a service: the survivors certify it dead and run the
/// service on another node.
#[test]
fn killed_node_is_declared_dead_and_its_service_moves() {
    let _serial = serialize();
    if !netns::can_run("killed_node_is_declared_dead_and_its_service_moves", 2, false) {
        return;
    }
    let mut cluster = Cluster::new(2, 5);
    cluster.start_all();
    let hosts = all(5);
    cluster.wait_until("all five nodes alive everywhere", None, |c| c.all_see(&hosts, &hosts, "alive"));

    let arg = unique_sleep_arg(2);
    let job = cluster.submit(0, &sleep_service("long-service", &arg, 1));
    let mut owner = None;
    cluster.wait_until("the service to run, with its process on its owner", Some(&job), |c| {
        owner = agreed_owners(c, &hosts, &job).map(|o| o[0]);
        owner.is_some_and(|o| process_hosts(c, &arg) == Some(vec![o]))
    });
    let victim = owner.expect("an owner");

    cluster.kill9(victim);
    let survivors: Vec<usize> = hosts.iter().copied().filter(|&i| i != victim).collect();
    cluster.wait_until("every survivor to report the killed node dead", Some(&job), |c| {
        c.all_see(&survivors, &[victim], "dead")
    });
    cluster.wait_until("the service to run on a survivor, as every survivor sees it", Some(&job), |c| {
        agreed_owners(c, &survivors, &job).is_some_and(|o| o[0] != victim)
    });
    let new_owner = agreed_owners(&cluster, &survivors, &job).expect("an owner")[0];
    // Its process runs there (the killed agent's orphan lives on in the dead host's namespace).
    cluster.wait_until("the moved service's process to run on its new owner", Some(&job), |c| {
        process_hosts(c, &arg).is_some_and(|p| p.contains(&new_owner))
    });
}

/// An isolated node keeps running its work alone while the rest certify it dead and run the
/// work too; after the heal all nodes converge to one digest and one copy per instance.
#[test]
fn isolated_node_keeps_running_and_rejoins_with_one_copy_per_instance() {
    let _serial = serialize();
    if !netns::can_run("isolated_node_keeps_running_and_rejoins_with_one_copy_per_instance", 3, true) {
        return;
    }
    let mut cluster = Cluster::new(3, 5);
    cluster.start_all();
    let hosts = all(5);
    cluster.wait_until("all five nodes alive everywhere", None, |c| c.all_see(&hosts, &hosts, "alive"));

    let arg = unique_sleep_arg(3);
    let job = cluster.submit(0, &sleep_service("isolated-service", &arg, 2));
    let mut owners = Vec::new();
    cluster.wait_until("both instances to run, one process each", Some(&job), |c| {
        owners = agreed_owners(c, &hosts, &job).unwrap_or_default();
        !owners.is_empty() && process_hosts(c, &arg).as_ref() == Some(&owners)
    });
    // Cut off the node that runs instance 0.
    let instance0 = running_owners(&cluster.job(0, &job).expect("the job")).expect("running")[0].clone();
    let lonely = cluster.host_of(&instance0).expect("a test host");
    let rest: Vec<usize> = hosts.iter().copied().filter(|&i| i != lonely).collect();

    cluster.isolate(lonely);
    cluster.wait_until("the rest to certify the isolated node dead and run every instance", Some(&job), |c| {
        c.all_see(&rest, &[lonely], "dead") && agreed_owners(c, &rest, &job).is_some_and(|o| !o.contains(&lonely))
    });
    cluster.wait_until("the isolated node to still run instance 0 itself", Some(&job), |c| {
        let own_view = c.job(lonely, &job).map(|j| instances(&j)).unwrap_or_default();
        let runs_it = own_view.first().is_some_and(|i| i["status"] == "running" && i["node_id"] == instance0.as_str());
        runs_it && process_hosts(c, &arg).is_some_and(|p| p.contains(&lonely))
    });

    cluster.heal();
    cluster.wait_until(
        "convergence after the heal: all alive everywhere, one digest, one process per instance on its owner",
        Some(&job),
        |c| {
            c.all_see(&hosts, &hosts, "alive")
                && c.same_digest(&hosts)
                && agreed_owners(c, &hosts, &job)
                    .is_some_and(|owners| owners.len() == 2 && process_hosts(c, &arg) == Some(owners))
        },
    );
}

/// A 2|3 split: both sides accept and run new batch jobs; after the heal every node sees
/// every job succeeded.
#[test]
fn both_sides_of_a_split_make_progress_and_nothing_is_lost() {
    let _serial = serialize();
    if !netns::can_run("both_sides_of_a_split_make_progress_and_nothing_is_lost", 4, true) {
        return;
    }
    let mut cluster = Cluster::new(4, 5);
    cluster.start_all();
    let hosts = all(5);
    cluster.wait_until("all five nodes alive everywhere", None, |c| c.all_see(&hosts, &hosts, "alive"));

    let (left, right) = ([0, 1], [2, 3, 4]);
    cluster.partition(&[&left, &right]);
    cluster.wait_until("each side to certify the other dead", None, |c| {
        c.all_see(&left, &right, "dead") && c.all_see(&right, &left, "dead")
    });

    // Two jobs accepted by every node, each on its own side.
    let mut accepted: Vec<(usize, String)> = Vec::new();
    for i in hosts.iter().copied() {
        accepted.push((i, cluster.submit(i, &batch(&format!("true-on-h{i}"), "true", &[]))));
        accepted.push((i, cluster.submit(i, &batch(&format!("echo-on-h{i}"), "sh", &["-c", "echo x"]))));
    }
    cluster.wait_until("every job to succeed on its own side", None, |c| {
        accepted.iter().all(|(i, id)| c.job(*i, id).is_some_and(|j| j["status"] == "succeeded"))
    });

    cluster.heal();
    cluster.wait_until("every node to see all nodes alive and every job succeeded, with one digest", None, |c| {
        c.all_see(&hosts, &hosts, "alive")
            && hosts
                .iter()
                .all(|&o| accepted.iter().all(|(_, id)| c.job(o, id).is_some_and(|j| j["status"] == "succeeded")))
            && c.same_digest(&hosts)
    });
    // Zero lost: every acknowledged job is in every table, succeeded (checked above), and each
    // node lists exactly these jobs.
    for &o in &hosts {
        let listed = cluster.get(o, "/v1/jobs").and_then(|v| v.as_array().map(Vec::len));
        assert_eq!(listed, Some(accepted.len()), "{} lists another number of jobs", cluster.hosts[o].name);
    }
}

/// An agent paused (SIGSTOP) past the detection time is certified dead; resumed (SIGCONT) it
/// refutes, every node sees it alive again, and the jobs it acknowledged are all there.
#[test]
fn paused_agent_refutes_its_death_and_keeps_its_jobs() {
    let _serial = serialize();
    if !netns::can_run("paused_agent_refutes_its_death_and_keeps_its_jobs", 5, false) {
        return;
    }
    let mut cluster = Cluster::new(5, 5);
    cluster.start_all();
    let hosts = all(5);
    cluster.wait_until("all five nodes alive everywhere", None, |c| c.all_see(&hosts, &hosts, "alive"));

    let paused = 1;
    let others: Vec<usize> = hosts.iter().copied().filter(|&i| i != paused).collect();
    let arg = unique_sleep_arg(5);
    let service = cluster.submit(paused, &sleep_service("paused-service", &arg, 1));
    let batch_job = cluster.submit(paused, &batch("paused-batch", "true", &[]));
    cluster.wait_until("the paused node's jobs to be known everywhere and under way", Some(&service), |c| {
        hosts.iter().all(|&o| {
            c.job(o, &batch_job).is_some_and(|j| j["status"] == "succeeded")
                && c.job(o, &service).and_then(|j| running_owners(&j)).is_some()
        })
    });

    let incarnation_before = incarnation_seen_by(&cluster, paused, paused).expect("its own incarnation");
    let pid = cluster.hosts[paused].pid();
    netns::signal(pid, "STOP");
    // (If a wait below fails, the cluster's Drop SIGKILLs the agent, which also ends a
    // stopped process.)
    let stopped_at = Instant::now();
    // Paused well past the detection time (probes and suspicion take about a second).
    cluster.wait_until("the others to certify the paused node dead, and 4 s to pass", Some(&service), |c| {
        c.all_see(&others, &[paused], "dead") && stopped_at.elapsed() >= Duration::from_secs(4)
    });
    netns::signal(pid, "CONT");

    cluster.wait_until("every node to see every node alive again (refuted)", Some(&service), |c| {
        c.all_see(&hosts, &hosts, "alive")
    });
    cluster.wait_until(
        "the acknowledged jobs everywhere: batch succeeded, service running once, one digest",
        Some(&service),
        |c| {
            hosts.iter().all(|&o| c.job(o, &batch_job).is_some_and(|j| j["status"] == "succeeded"))
                && agreed_owners(c, &hosts, &service).is_some_and(|owners| process_hosts(c, &arg) == Some(owners))
                && c.same_digest(&hosts)
        },
    );
    // It refuted by raising its incarnation, and everyone has the new one.
    for &o in &hosts {
        let seen = incarnation_seen_by(&cluster, o, paused);
        assert!(
            seen.is_some_and(|inc| inc > incarnation_before),
            "{} sees the paused node at incarnation {seen:?}, before the pause it was {incarnation_before}",
            cluster.hosts[o].name
        );
    }
}

/// The incarnation of host `subject` as host `observer` reports it.
fn incarnation_seen_by(cluster: &Cluster, observer: usize, subject: usize) -> Option<u64> {
    let nodes = cluster.get(observer, "/v1/nodes")?;
    let node = nodes.as_array()?.iter().find(|n| n["id"] == cluster.hosts[subject].node_id.as_str())?;
    node["incarnation"].as_u64()
}
