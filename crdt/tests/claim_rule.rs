//! Unit tests of the pure claim rule (`colony_crdt::rules`), on records built by hand.
//!
//! Rank order is never hard-coded: each test computes the rank keys of its nodes and names
//! them `best`, `second`, ... so the tests hold whatever the hash function is.

use colony_crdt::rules::{
    self, evaluate_instance, finished_at_ms, job_status, jobs_to_compact, membership, placement_score, rank_key, winner,
};
use colony_crdt::{
    Claim, InstanceStatus, InstanceView, JobHeader, JobKind, JobRecord, JobSpec, JobStatus, NodeId, NodeMode,
    NodeRecord, NodeState, Resources, Run, RunStatus, StopRequest,
};
use std::collections::{BTreeMap, BTreeSet};

const JOB: &str = "00112233445566778899aabbccddeeff";

// ---------------------------------------------------------------- builders

fn batch(attempts: u32, delay_ms: u64, backoff: f64) -> JobSpec {
    let mut spec = JobSpec::command("true", Vec::<String>::new());
    spec.restart.attempts = attempts;
    spec.restart.delay_ms = delay_ms;
    spec.restart.backoff = backoff;
    spec.restart.max_delay_ms = 1_000_000;
    spec.validate().expect("test spec is valid");
    spec
}

fn service(delay_ms: u64) -> JobSpec {
    let mut spec = batch(3, delay_ms, 1.0);
    spec.kind = JobKind::Service;
    spec
}

fn record(spec: &JobSpec) -> JobRecord {
    JobRecord {
        header: Some(std::sync::Arc::new(JobHeader {
            spec: spec.clone(),
            submitted_by: "submitter".into(),
            submitted_at_ms: 10,
        })),
        ..JobRecord::default()
    }
}

fn claim(attempt: u32) -> Claim {
    Claim { attempt, boot: 1, at_ms: 100 }
}

fn running(started_ms: u64) -> Run {
    Run { status: RunStatus::Running, boot: 1, started_ms, finished_ms: None, exit_code: None, reason: None }
}

fn ended(status: RunStatus, started_ms: u64, finished_ms: u64, exit_code: Option<i32>) -> Run {
    Run { status, boot: 1, started_ms, finished_ms: Some(finished_ms), exit_code, reason: None }
}

fn add_claim(rec: &mut JobRecord, index: u32, node: &str, attempt: u32) {
    rec.claims.insert((index, node.to_string()), claim(attempt));
}

fn add_run(rec: &mut JobRecord, index: u32, attempt: u32, node: &str, run: Run) {
    rec.runs.insert((index, attempt, node.to_string()), run);
}

/// `nodes` sorted by rank key for (JOB, index, attempt): the first is the rightful winner.
fn ranked(index: u32, attempt: u32, nodes: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
    v.sort_by_key(|n| (rank_key(JOB, index, attempt, n), n.clone()));
    v
}

const FIVE: [&str; 5] = ["node-a", "node-b", "node-c", "node-d", "node-e"];

fn alive(_: &str) -> NodeState {
    NodeState::Alive
}

/// A state function from a membership map; unknown nodes are alive (as `Table::node_state`).
fn states_fn(states: BTreeMap<NodeId, NodeState>) -> impl Fn(&str) -> NodeState {
    move |n: &str| states.get(n).copied().unwrap_or(NodeState::Alive)
}

fn node(incarnation: u64) -> NodeRecord {
    NodeRecord { incarnation, ..NodeRecord::default() }
}

fn eval(rec: &JobRecord, spec: &JobSpec, index: u32, state: &dyn Fn(&str) -> NodeState) -> InstanceView {
    evaluate_instance(JOB, rec, spec, index, state)
}

// ---------------------------------------------------------------- rank and winner

#[test]
fn rank_key_is_a_pure_function_of_its_four_inputs() {
    let k = rank_key(JOB, 0, 0, "node-a");
    assert_eq!(k, rank_key(JOB, 0, 0, "node-a"));
    assert_ne!(k, rank_key(JOB, 1, 0, "node-a"));
    assert_ne!(k, rank_key(JOB, 0, 1, "node-a"));
    assert_ne!(k, rank_key(JOB, 0, 0, "node-b"));
    assert_ne!(k, rank_key("another-job", 0, 0, "node-a"));
}

#[test]
fn concurrent_claims_lowest_rank_key_wins() {
    let spec = batch(3, 1000, 2.0);
    for count in 3..=5 {
        let nodes = &FIVE[..count];
        let order = ranked(0, 0, nodes);
        let mut rec = record(&spec);
        for n in nodes {
            add_claim(&mut rec, 0, n, 0);
        }
        assert_eq!(winner(JOB, &rec, 0, 0, &alive), Some(&order[0]), "{count} claims");
        let view = eval(&rec, &spec, 0, &alive);
        assert_eq!(view.status, InstanceStatus::Claimed);
        assert_eq!(view.owner.as_ref(), Some(&order[0]));
        assert_eq!(view.attempt, 0);
    }
}

#[test]
fn winner_is_independent_of_insertion_order_and_of_other_instances() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(1, 0, &FIVE);
    let mut forward = record(&spec);
    let mut backward = record(&spec);
    for n in FIVE {
        add_claim(&mut forward, 1, n, 0);
    }
    for n in FIVE.iter().rev() {
        add_claim(&mut backward, 1, n, 0);
    }
    // Claims on the neighbouring instances must not leak into instance 1.
    add_claim(&mut backward, 0, "zzz-other", 0);
    add_claim(&mut backward, 2, "aaa-other", 0);
    assert_eq!(winner(JOB, &forward, 1, 0, &alive), Some(&order[0]));
    assert_eq!(winner(JOB, &backward, 1, 0, &alive), Some(&order[0]));
    assert_eq!(winner(JOB, &forward, 0, 0, &alive), None);
}

#[test]
fn winner_over_many_jobs_matches_the_minimum_rank_key() {
    // A cross-check over many (job, index) pairs against an independent computation.
    let spec = batch(3, 1000, 2.0);
    for j in 0..200u32 {
        let job = format!("job-{j}");
        let index = j % 7;
        let mut rec = record(&spec);
        for n in &FIVE[..3 + (j as usize % 3)] {
            rec.claims.insert((index, n.to_string()), claim(0));
        }
        let expected = rec.claims.keys().map(|(_, n)| n).min_by_key(|n| rank_key(&job, index, 0, n)).unwrap();
        assert_eq!(winner(&job, &rec, index, 0, &alive), Some(expected), "job {job}");
    }
}

#[test]
fn a_node_finds_it_lost_and_the_view_names_the_winner() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..3]);
    let (best, loser) = (&order[0], &order[2]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, loser, 0);
    // Alone, the loser wins.
    assert_eq!(winner(JOB, &rec, 0, 0, &alive), Some(loser));
    // The better claim lands: the loser's claim is no longer the winner, whoever wrote first.
    add_claim(&mut rec, 0, best, 0);
    let w = winner(JOB, &rec, 0, 0, &alive);
    assert_eq!(w, Some(best));
    assert_ne!(w, Some(loser));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.owner.as_ref(), Some(best));
    // Even if the loser already started its copy, the winner still owns the instance.
    add_run(&mut rec, 0, 0, loser, running(150));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.status, InstanceStatus::Claimed);
    assert_eq!(view.owner.as_ref(), Some(best));
}

#[test]
fn a_claim_for_another_attempt_does_not_count() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 1, &FIVE[..2]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, &order[0], 0); // stale: attempt 0
    add_claim(&mut rec, 0, &order[1], 1);
    assert_eq!(winner(JOB, &rec, 0, 1, &alive), Some(&order[1]));
    assert_eq!(winner(JOB, &rec, 0, 0, &alive), Some(&order[0]));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.attempt, 1, "the current attempt is the highest claimed");
    assert_eq!(view.owner.as_ref(), Some(&order[1]));
}

#[test]
fn claims_of_a_dead_node_do_not_count_and_the_next_valid_claim_wins() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..4]);
    let mut rec = record(&spec);
    for n in &order {
        add_claim(&mut rec, 0, n, 0);
    }
    // An observer certifies the best node dead at its current incarnation.
    let mut nodes: BTreeMap<NodeId, NodeRecord> = order.iter().map(|n| (n.clone(), node(0))).collect();
    nodes.get_mut(&order[3]).unwrap().deaths.insert(order[0].clone(), 0);
    let states = membership(&nodes);
    assert_eq!(states[&order[0]], NodeState::Dead);
    let state = states_fn(states);
    assert_eq!(winner(JOB, &rec, 0, 0, &state), Some(&order[1]));
    // Then the second too: the third wins.
    nodes.get_mut(&order[3]).unwrap().deaths.insert(order[1].clone(), 0);
    let state = states_fn(membership(&nodes));
    assert_eq!(winner(JOB, &rec, 0, 0, &state), Some(&order[2]));
    let view = eval(&rec, &spec, 0, &state);
    assert_eq!((view.status, view.owner.as_ref()), (InstanceStatus::Claimed, Some(&order[2])));
}

#[test]
fn a_dead_winner_running_leaves_the_instance_pending_for_others() {
    let spec = batch(3, 1000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", running(100));
    let mut nodes = BTreeMap::new();
    nodes.insert("node-a".to_string(), node(0));
    let mut observer = node(0);
    observer.deaths.insert("node-a".into(), 0);
    nodes.insert("node-b".to_string(), observer);
    let state = states_fn(membership(&nodes));
    let view = eval(&rec, &spec, 0, &state);
    assert_eq!(view.status, InstanceStatus::Pending);
    assert_eq!(view.attempt, 0, "the same attempt is claimed again: a death is not a failure");
    assert_eq!(view.owner, None);
    assert_eq!(view.failures, 0);
}

#[test]
fn a_suspected_node_still_counts() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..2]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, &order[0], 0);
    add_claim(&mut rec, 0, &order[1], 0);
    let mut nodes: BTreeMap<NodeId, NodeRecord> = order.iter().map(|n| (n.clone(), node(0))).collect();
    nodes.get_mut(&order[1]).unwrap().suspects.insert(order[0].clone(), 0);
    let states = membership(&nodes);
    assert_eq!(states[&order[0]], NodeState::Suspect);
    assert!(NodeState::Suspect.counts());
    assert_eq!(winner(JOB, &rec, 0, 0, &states_fn(states)), Some(&order[0]));
}

#[test]
fn a_death_certificate_is_refuted_by_a_higher_incarnation() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..3]);
    let mut rec = record(&spec);
    for n in &order {
        add_claim(&mut rec, 0, n, 0);
    }
    let mut nodes: BTreeMap<NodeId, NodeRecord> = order.iter().map(|n| (n.clone(), node(0))).collect();
    nodes.get_mut(&order[2]).unwrap().deaths.insert(order[0].clone(), 0);
    assert_eq!(winner(JOB, &rec, 0, 0, &states_fn(membership(&nodes))), Some(&order[1]));
    // The best node raises its incarnation: the certificate no longer applies.
    nodes.get_mut(&order[0]).unwrap().incarnation = 1;
    let states = membership(&nodes);
    assert_eq!(states[&order[0]], NodeState::Alive);
    assert_eq!(winner(JOB, &rec, 0, 0, &states_fn(states)), Some(&order[0]));
    // A certificate at the new incarnation kills it again (>=, not >).
    nodes.get_mut(&order[1]).unwrap().deaths.insert(order[0].clone(), 1);
    let states = membership(&nodes);
    assert_eq!(states[&order[0]], NodeState::Dead);
    assert_eq!(winner(JOB, &rec, 0, 0, &states_fn(states)), Some(&order[1]));
}

#[test]
fn membership_rules() {
    let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
    // A node's certificate of itself is ignored.
    let mut a = node(0);
    a.deaths.insert("a".into(), 5);
    a.suspects.insert("a".into(), 5);
    nodes.insert("a".into(), a);
    // The worst certificate across observers counts.
    let mut b = node(0);
    b.deaths.insert("c".into(), 1);
    b.suspects.insert("d".into(), 0);
    b.deaths.insert("ghost".into(), 0);
    b.suspects.insert("phantom".into(), 0);
    nodes.insert("b".into(), b);
    nodes.insert("c".into(), node(2));
    nodes.insert("d".into(), node(0));
    let mut e = node(0);
    e.deaths.insert("c".into(), 3);
    nodes.insert("e".into(), e);
    let mut left = node(9);
    left.mode = NodeMode::Left;
    nodes.insert("left".into(), left);
    let mut draining = node(0);
    draining.mode = NodeMode::Draining;
    nodes.insert("draining".into(), draining);

    let states = membership(&nodes);
    assert_eq!(states["a"], NodeState::Alive);
    assert_eq!(states["b"], NodeState::Alive);
    assert_eq!(states["c"], NodeState::Dead, "e's certificate at 3 >= c's incarnation 2");
    assert_eq!(states["d"], NodeState::Suspect);
    assert_eq!(states["ghost"], NodeState::Dead, "a certified node with no record is dead");
    assert!(!states.contains_key("phantom"), "a merely suspected unknown node is not listed");
    assert_eq!(states["left"], NodeState::Left);
    assert_eq!(states["draining"], NodeState::Alive, "draining nodes' claims still count");
    assert!(!NodeState::Dead.counts() && !NodeState::Left.counts());
    assert!(NodeState::Alive.counts() && NodeState::Suspect.counts());

    // Membership does not depend on the order records arrive in (BTreeMap input, but the
    // reduction over observers must be order-free too): rebuild in reverse and compare.
    let reversed: BTreeMap<NodeId, NodeRecord> = nodes.into_iter().rev().collect();
    assert_eq!(membership(&reversed), states);
}

#[test]
fn a_death_outranks_a_suspicion_and_stale_ones_are_ignored() {
    let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
    nodes.insert("x".into(), node(4));
    let mut o1 = node(0);
    o1.suspects.insert("x".into(), 4);
    o1.deaths.insert("x".into(), 3); // stale: below x's incarnation
    nodes.insert("o1".into(), o1);
    assert_eq!(membership(&nodes)["x"], NodeState::Suspect);
    nodes.get_mut("o1").unwrap().suspects.insert("x".into(), 2); // stale suspicion
    assert_eq!(membership(&nodes)["x"], NodeState::Alive);
    let mut o2 = node(0);
    o2.deaths.insert("x".into(), 4);
    o2.suspects.insert("x".into(), 4);
    nodes.insert("o2".into(), o2);
    assert_eq!(membership(&nodes)["x"], NodeState::Dead);
}

#[test]
fn a_node_in_mode_left_does_not_count_even_with_a_higher_incarnation() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..2]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, &order[0], 0);
    add_claim(&mut rec, 0, &order[1], 0);
    let mut nodes: BTreeMap<NodeId, NodeRecord> = order.iter().map(|n| (n.clone(), node(0))).collect();
    let best = nodes.get_mut(&order[0]).unwrap();
    best.mode = NodeMode::Left;
    best.incarnation = 7;
    let states = membership(&nodes);
    assert_eq!(states[&order[0]], NodeState::Left);
    assert_eq!(winner(JOB, &rec, 0, 0, &states_fn(states.clone())), Some(&order[1]));
    // Its running copy no longer owns the instance.
    add_run(&mut rec, 0, 0, &order[0], running(100));
    let view = eval(&rec, &spec, 0, &states_fn(states));
    assert_eq!((view.status, view.owner.as_ref()), (InstanceStatus::Claimed, Some(&order[1])));
    // It comes back (mode active): its claim counts again.
    nodes.get_mut(&order[0]).unwrap().mode = NodeMode::Active;
    let view = eval(&rec, &spec, 0, &states_fn(membership(&nodes)));
    assert_eq!((view.status, view.owner.as_ref()), (InstanceStatus::Running, Some(&order[0])));
}

// ---------------------------------------------------------------- partitions

/// Two sides of a healed partition: each certified the other dead at incarnation 0, and each
/// claimed and ran attempt 0 of the instance.
fn split_brain(spec: &JobSpec) -> (Vec<String>, JobRecord, BTreeMap<NodeId, NodeRecord>) {
    let order = ranked(0, 0, &FIVE[..2]);
    let mut rec = record(spec);
    for n in &order {
        add_claim(&mut rec, 0, n, 0);
        add_run(&mut rec, 0, 0, n, running(200));
    }
    let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
    let mut a = node(0);
    a.deaths.insert(order[1].clone(), 0);
    let mut b = node(0);
    b.deaths.insert(order[0].clone(), 0);
    nodes.insert(order[0].clone(), a);
    nodes.insert(order[1].clone(), b);
    (order, rec, nodes)
}

#[test]
fn partition_heal_before_refutation_no_claim_counts() {
    let spec = batch(3, 1000, 2.0);
    let (_, rec, nodes) = split_brain(&spec);
    let states = membership(&nodes);
    assert!(states.values().all(|s| *s == NodeState::Dead));
    let view = eval(&rec, &spec, 0, &states_fn(states));
    assert_eq!(view.status, InstanceStatus::Pending);
    assert_eq!(view.duplicate_runs, 1, "both copies are counted, never hidden (I3)");
}

#[test]
fn partition_heal_both_refute_lowest_rank_key_keeps_its_copy() {
    for spec in [batch(3, 1000, 2.0), service(1000)] {
        let (order, mut rec, mut nodes) = split_brain(&spec);
        for n in &order {
            nodes.get_mut(n).unwrap().incarnation = 1;
        }
        let state = states_fn(membership(&nodes));
        assert_eq!(winner(JOB, &rec, 0, 0, &state), Some(&order[0]));
        let view = eval(&rec, &spec, 0, &state);
        assert_eq!(view.status, InstanceStatus::Running);
        assert_eq!(view.owner.as_ref(), Some(&order[0]));
        assert_eq!(view.duplicate_runs, 1);
        // The loser stops its copy: the view does not change, and the count stays.
        add_run(&mut rec, 0, 0, &order[1], ended(RunStatus::Stopped, 200, 900, None));
        let after = eval(&rec, &spec, 0, &state);
        assert_eq!((after.status, after.owner.as_ref()), (InstanceStatus::Running, Some(&order[0])));
        assert_eq!(after.duplicate_runs, 1);
        assert_eq!(after.failures, 0, "a stopped duplicate is not a failure");
    }
}

#[test]
fn partition_heal_one_side_already_succeeded_the_instance_is_succeeded() {
    let spec = batch(3, 1000, 2.0);
    // Whichever side finished, rank winner or loser, the batch instance is done.
    for finisher in 0..2 {
        let (order, mut rec, mut nodes) = split_brain(&spec);
        add_run(&mut rec, 0, 0, &order[finisher], ended(RunStatus::Succeeded, 200, 500, Some(0)));
        // Before refutation, and after.
        for refuted in [false, true] {
            if refuted {
                for n in &order {
                    nodes.get_mut(n).unwrap().incarnation = 1;
                }
            }
            let view = eval(&rec, &spec, 0, &states_fn(membership(&nodes)));
            assert_eq!(view.status, InstanceStatus::Succeeded, "finisher {finisher} refuted {refuted}");
            assert_eq!(view.owner.as_ref(), Some(&order[finisher]));
            assert_eq!(view.exit_code, Some(0));
            assert_eq!(view.duplicate_runs, 1);
            assert_eq!(job_status(false, &[view]), JobStatus::Succeeded);
        }
    }
}

#[test]
fn partition_heal_one_side_failed_other_still_runs() {
    // After refutation, a failure by the rank loser is a duplicate's failure: the winner's
    // copy keeps the instance Running. A failure by the winner moves to the next attempt.
    let spec = batch(3, 1000, 2.0);
    let (order, rec, mut nodes) = split_brain(&spec);
    for n in &order {
        nodes.get_mut(n).unwrap().incarnation = 1;
    }
    let state = states_fn(membership(&nodes));

    let mut loser_failed = rec.clone();
    add_run(&mut loser_failed, 0, 0, &order[1], ended(RunStatus::Failed, 200, 400, Some(1)));
    let view = eval(&loser_failed, &spec, 0, &state);
    assert_eq!((view.status, view.owner.as_ref()), (InstanceStatus::Running, Some(&order[0])));
    assert_eq!(view.failures, 1, "the duplicate's failure is still counted");
    assert!(view.failed_on.contains(&order[1]));

    let mut winner_failed = rec;
    add_run(&mut winner_failed, 0, 0, &order[0], ended(RunStatus::Failed, 200, 400, Some(1)));
    let view = eval(&winner_failed, &spec, 0, &state);
    assert_eq!(view.status, InstanceStatus::Pending);
    assert_eq!(view.attempt, 1);
    assert_eq!(view.not_before_ms, 400 + 1000);
}

// ---------------------------------------------------------------- given-up claims

#[test]
fn a_node_gives_its_claim_up_by_deleting_it() {
    // A node that gives an instance up (its copy lost, stopped or superseded) deletes its claim
    // in the same step; the next valid claim then wins at the same attempt.
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..3]);
    for status in [RunStatus::Lost, RunStatus::Stopped] {
        let mut rec = record(&spec);
        for n in &order {
            add_claim(&mut rec, 0, n, 0);
        }
        add_run(&mut rec, 0, 0, &order[0], ended(status, 100, 200, None));
        rec.claims.remove(&(0, order[0].clone()));
        assert_eq!(winner(JOB, &rec, 0, 0, &alive), Some(&order[1]), "{status:?}");
        let view = eval(&rec, &spec, 0, &alive);
        assert_eq!((view.status, view.owner.as_ref()), (InstanceStatus::Claimed, Some(&order[1])));
        assert_eq!(view.attempt, 0, "a lost or stopped run does not use up an attempt");
        assert_eq!(view.failures, 0);
    }
}

#[test]
fn run_history_does_not_bear_on_claim_validity() {
    // A claim present is a claim meant, whatever runs that node had at the attempt.
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..2]);
    for status in [RunStatus::Lost, RunStatus::Stopped, RunStatus::Failed, RunStatus::Running] {
        let mut rec = record(&spec);
        add_claim(&mut rec, 0, &order[0], 0);
        add_claim(&mut rec, 0, &order[1], 0);
        add_run(&mut rec, 0, 0, &order[0], ended(status, 100, 200, None));
        assert!(rules::claim_is_valid(&rec, 0, 0, &order[0], &claim(0), &alive), "{status:?}");
        assert_eq!(winner(JOB, &rec, 0, 0, &alive), Some(&order[0]), "{status:?}");
    }
    // Validity is the attempt and the node's state, nothing else.
    let rec = record(&spec);
    assert!(!rules::claim_is_valid(&rec, 0, 1, &order[0], &claim(0), &alive));
    let dead = |_: &str| NodeState::Dead;
    assert!(!rules::claim_is_valid(&rec, 0, 0, &order[0], &claim(0), &dead));
}

#[test]
fn a_lost_run_of_the_only_claimant_leaves_the_instance_pending() {
    let spec = batch(3, 1000, 2.0);
    let mut rec = record(&spec);
    // node-a's run was lost and its claim withdrawn.
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Lost, 100, 200, None));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_ref(), view.attempt), (InstanceStatus::Pending, None, 0));
    // Another node picks the same attempt up.
    add_claim(&mut rec, 0, "node-b", 0);
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_deref()), (InstanceStatus::Claimed, Some("node-b")));
    add_run(&mut rec, 0, 0, "node-b", running(300));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_deref()), (InstanceStatus::Running, Some("node-b")));
}

/// Regression (I2): the node core marks its runs Lost after a restart and withdraws its
/// claims; the instance is then Pending at the *same* attempt, and the node claims that attempt
/// again. It must be able to win it, or a lone eligible node never reruns the instance.
#[test]
fn a_node_that_lost_its_run_can_claim_the_instance_again() {
    let spec = batch(3, 1000, 2.0);
    let mut rec = record(&spec);
    // Boot 1: claimed, started, then the node restarted (boot 2): the run is marked Lost
    // (keeping the run's boot 1), and the old claim is withdrawn.
    add_run(
        &mut rec,
        0,
        0,
        "solo",
        Run { reason: Some("node restarted".into()), ..ended(RunStatus::Lost, 100, 500, None) },
    );
    // The engine's loop: evaluate; while Pending, claim view.attempt with the new boot.
    let mut view = eval(&rec, &spec, 0, &alive);
    for _ in 0..3 {
        if view.status != InstanceStatus::Pending {
            break;
        }
        rec.claims.insert((0, "solo".into()), Claim { attempt: view.attempt, boot: 2, at_ms: 600 });
        view = eval(&rec, &spec, 0, &alive);
    }
    assert_eq!(
        (view.status, view.owner.as_deref()),
        (InstanceStatus::Claimed, Some("solo")),
        "the only node alive must be able to run the instance again: {view:?}"
    );
}

/// Regression (I2): a partition duplicate that stopped its copy must be able to take the
/// instance over at the same attempt when the rank winner then dies.
#[test]
fn a_superseded_node_can_take_over_when_the_winner_dies() {
    let spec = batch(3, 1000, 2.0);
    let order = ranked(0, 0, &FIVE[..2]);
    let (best, survivor) = (&order[0], &order[1]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, best, 0);
    add_run(&mut rec, 0, 0, best, running(100));
    // After the heal the survivor lost the rank comparison and stopped its copy.
    add_run(&mut rec, 0, 0, survivor, ended(RunStatus::Stopped, 100, 300, None));
    // Then the winner dies while running; the survivor is the only node left.
    let state = |n: &str| if n == best.as_str() { NodeState::Dead } else { NodeState::Alive };
    let mut view = eval(&rec, &spec, 0, &state);
    for boot in 2..5 {
        if view.status != InstanceStatus::Pending {
            break;
        }
        rec.claims.insert((0, survivor.clone()), Claim { attempt: view.attempt, boot, at_ms: 1_000 });
        view = eval(&rec, &spec, 0, &state);
    }
    assert_eq!(view.owner.as_ref(), Some(survivor), "the survivor must be able to take the instance over: {view:?}");
}

/// `InstanceView::duplicate_runs` is documented as "copies that ran concurrently (during a
/// partition, or before a lost claim was noticed)", but it counts every run beyond one per
/// attempt, so a node crash (run Lost, the same attempt rerun by another node) is reported as
/// a duplicate though the two copies never overlapped.
#[test]

fn a_lost_run_and_its_replacement_are_not_duplicates() {
    let spec = batch(3, 1000, 2.0);
    let mut rec = record(&spec);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Lost, 100, 200, None));
    add_claim(&mut rec, 0, "node-b", 0);
    add_run(&mut rec, 0, 0, "node-b", running(300));
    assert_eq!(eval(&rec, &spec, 0, &alive).duplicate_runs, 0);
}

// ---------------------------------------------------------------- failures and restarts

#[test]
fn batch_failure_is_pending_at_the_next_attempt_after_the_delay() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 100, 5_000, Some(3)));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.status, InstanceStatus::Pending);
    assert_eq!(view.attempt, 1);
    assert_eq!(view.not_before_ms, 5_000 + 1_000);
    assert_eq!(view.failures, 1);
    assert_eq!(view.exit_code, Some(3));
    assert_eq!(view.owner.as_deref(), Some("node-a"));
    assert_eq!(view.failed_on, BTreeSet::from(["node-a".to_string()]));

    // The retry is claimed by another node and fails too: the delay doubles.
    add_claim(&mut rec, 0, "node-b", 1);
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.attempt, view.owner.as_deref()), (InstanceStatus::Claimed, 1, Some("node-b")));
    assert_eq!(view.not_before_ms, 0);
    add_run(&mut rec, 0, 1, "node-b", ended(RunStatus::Failed, 6_000, 7_000, Some(4)));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.attempt), (InstanceStatus::Pending, 2));
    assert_eq!(view.not_before_ms, 7_000 + 2_000);
    assert_eq!(view.failures, 2);
    assert_eq!(view.failed_on.len(), 2);
}

#[test]
fn a_failure_without_finish_time_counts_from_its_start() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(
        &mut rec,
        0,
        0,
        "node-a",
        Run { status: RunStatus::Failed, boot: 1, started_ms: 42, finished_ms: None, exit_code: None, reason: None },
    );
    assert_eq!(eval(&rec, &spec, 0, &alive).not_before_ms, 42 + 1_000);
}

#[test]
fn attempts_exhausted_is_failed() {
    let spec = batch(2, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 100, 200, Some(1)));
    assert_eq!(eval(&rec, &spec, 0, &alive).status, InstanceStatus::Pending);
    add_claim(&mut rec, 0, "node-a", 1);
    add_run(&mut rec, 0, 1, "node-a", ended(RunStatus::Failed, 1_300, 1_400, Some(2)));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.status, InstanceStatus::Failed);
    assert!(view.status.is_terminal());
    assert_eq!(view.failures, 2);
    assert_eq!(view.attempt, 1);
    assert_eq!(view.exit_code, Some(2));
    assert_eq!(job_status(false, &[view]), JobStatus::Failed);

    // attempts = 1: the first failure is final.
    let spec = batch(1, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 100, 200, Some(1)));
    assert_eq!(eval(&rec, &spec, 0, &alive).status, InstanceStatus::Failed);
}

#[test]
fn a_success_after_failures_is_succeeded() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 1);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 100, 200, Some(1)));
    add_run(&mut rec, 0, 1, "node-a", ended(RunStatus::Succeeded, 1_300, 1_400, Some(0)));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.attempt, view.failures), (InstanceStatus::Succeeded, 1, 1));
}

#[test]
fn service_exit_restarts_forever() {
    let spec = service(500);
    let mut rec = record(&spec);
    for (attempt, status) in
        [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Succeeded, RunStatus::Failed, RunStatus::Failed]
            .into_iter()
            .enumerate()
    {
        let attempt = attempt as u32;
        add_claim(&mut rec, 0, "node-a", attempt);
        add_run(&mut rec, 0, attempt, "node-a", running(1_000 * u64::from(attempt)));
        let view = eval(&rec, &spec, 0, &alive);
        assert_eq!((view.status, view.attempt), (InstanceStatus::Running, attempt));
        let finished = 1_000 * u64::from(attempt) + 100;
        add_run(&mut rec, 0, attempt, "node-a", ended(status, 1_000 * u64::from(attempt), finished, Some(0)));
        let view = eval(&rec, &spec, 0, &alive);
        assert_eq!(view.status, InstanceStatus::Pending, "a service exit ({status:?}) restarts");
        assert_eq!(view.attempt, attempt + 1);
        assert_eq!(view.failures, attempt + 1, "every exit of a service counts");
        assert_eq!(view.not_before_ms, finished + 500, "constant backoff 1.0");
    }
    // 5 exits against restart.attempts = 3: a service never becomes Failed.
}

#[test]
fn an_exit_by_a_non_winner_is_ignored_while_the_winner_runs() {
    let spec = service(500);
    let order = ranked(0, 0, &FIVE[..2]);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, &order[0], 0);
    add_claim(&mut rec, 0, &order[1], 0);
    add_run(&mut rec, 0, 0, &order[0], running(100));
    add_run(&mut rec, 0, 0, &order[1], ended(RunStatus::Failed, 100, 200, Some(9)));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_ref(), view.attempt), (InstanceStatus::Running, Some(&order[0]), 0));
}

#[test]
fn an_exit_counts_when_the_winner_is_gone() {
    // The runner was certified dead after it wrote its failure: no valid claim remains, and
    // the failure (by anyone) still moves the instance on.
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 100, 200, Some(1)));
    let state = |n: &str| if n == "node-a" { NodeState::Dead } else { NodeState::Alive };
    let view = eval(&rec, &spec, 0, &state);
    assert_eq!((view.status, view.attempt, view.not_before_ms), (InstanceStatus::Pending, 1, 1_200));
}

// ---------------------------------------------------------------- stop requests

#[test]
fn stop_request_running_while_a_live_run_remains_then_stopped() {
    let spec = service(500);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", running(100));
    rec.stops.insert("node-z".into(), StopRequest { at_ms: 1_000 });
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_deref()), (InstanceStatus::Running, Some("node-a")));
    assert_eq!(job_status(true, std::slice::from_ref(&view)), JobStatus::Running);

    // The runner's node is dead: nothing live runs, the instance is Stopped.
    let dead_a = |n: &str| if n == "node-a" { NodeState::Dead } else { NodeState::Alive };
    let view = eval(&rec, &spec, 0, &dead_a);
    assert_eq!((view.status, view.owner.as_deref()), (InstanceStatus::Stopped, None));

    // The runner stops its copy.
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Stopped, 100, 1_100, None));
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_deref()), (InstanceStatus::Stopped, None));
    assert!(view.status.is_terminal());
    assert_eq!(job_status(true, &[view]), JobStatus::Stopped);
}

#[test]
fn stop_request_with_no_run_is_stopped_even_if_claimed() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    rec.stops.insert("node-a".into(), StopRequest { at_ms: 50 });
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.status, InstanceStatus::Stopped);
}

#[test]
fn stop_request_after_a_batch_success_keeps_succeeded() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Succeeded, 100, 200, Some(0)));
    rec.stops.insert("node-a".into(), StopRequest { at_ms: 500 });
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!(view.status, InstanceStatus::Succeeded);
    assert_eq!(job_status(true, &[view]), JobStatus::Stopped, "the job as a whole was stopped");
}

#[test]
fn stop_request_a_live_run_at_an_old_attempt_still_counts() {
    // A copy that runs an older attempt is still a live process to wait for.
    let spec = service(500);
    let mut rec = record(&spec);
    add_run(&mut rec, 0, 0, "node-a", running(100));
    add_run(&mut rec, 0, 1, "node-b", ended(RunStatus::Stopped, 100, 200, None));
    rec.stops.insert("node-b".into(), StopRequest { at_ms: 150 });
    let view = eval(&rec, &spec, 0, &alive);
    assert_eq!((view.status, view.owner.as_deref(), view.attempt), (InstanceStatus::Running, Some("node-a"), 1));
}

// ---------------------------------------------------------------- duplicates

#[test]
fn duplicate_runs_counts_runs_beyond_one_per_attempt() {
    let spec = service(500);
    let mut rec = record(&spec);
    assert_eq!(eval(&rec, &spec, 0, &alive).duplicate_runs, 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Failed, 0, 1, Some(1)));
    add_run(&mut rec, 0, 1, "node-a", ended(RunStatus::Failed, 2, 3, Some(1)));
    add_run(&mut rec, 0, 2, "node-a", running(4));
    assert_eq!(eval(&rec, &spec, 0, &alive).duplicate_runs, 0, "one run per attempt is no duplicate");
    add_run(&mut rec, 0, 2, "node-b", running(4));
    add_run(&mut rec, 0, 2, "node-c", running(4));
    add_run(&mut rec, 0, 0, "node-d", ended(RunStatus::Stopped, 0, 1, None));
    assert_eq!(eval(&rec, &spec, 0, &alive).duplicate_runs, 3);
    // Runs of another instance are not this instance's duplicates.
    add_run(&mut rec, 1, 2, "node-a", running(4));
    add_run(&mut rec, 1, 2, "node-b", running(4));
    assert_eq!(eval(&rec, &spec, 0, &alive).duplicate_runs, 3);
    assert_eq!(eval(&rec, &spec, 1, &alive).duplicate_runs, 1);
    assert_eq!(eval(&rec, &spec, 2, &alive).duplicate_runs, 0);
}

// ---------------------------------------------------------------- job status

fn view(status: InstanceStatus) -> InstanceView {
    InstanceView {
        index: 0,
        status,
        attempt: 0,
        owner: None,
        not_before_ms: 0,
        failures: 0,
        exit_code: None,
        duplicate_runs: 0,
        failed_on: BTreeSet::new(),
    }
}

#[test]
fn job_status_aggregates_instances() {
    use InstanceStatus as I;
    let js = |stopped: bool, s: &[I]| job_status(stopped, &s.iter().map(|s| view(*s)).collect::<Vec<_>>());
    assert_eq!(js(false, &[I::Pending, I::Pending]), JobStatus::Pending);
    assert_eq!(js(false, &[I::Pending, I::Claimed]), JobStatus::Running);
    assert_eq!(js(false, &[I::Pending, I::Running]), JobStatus::Running);
    assert_eq!(js(false, &[I::Pending, I::Succeeded]), JobStatus::Running);
    assert_eq!(js(false, &[I::Succeeded, I::Succeeded]), JobStatus::Succeeded);
    assert_eq!(js(false, &[I::Succeeded, I::Failed]), JobStatus::Failed);
    assert_eq!(js(false, &[I::Failed]), JobStatus::Failed);
    assert_eq!(js(false, &[I::Running, I::Failed]), JobStatus::Running);
    assert_eq!(js(true, &[I::Stopped, I::Succeeded]), JobStatus::Stopped);
    assert_eq!(js(true, &[I::Stopped, I::Running]), JobStatus::Running);
    assert_eq!(js(true, &[I::Stopped]), JobStatus::Stopped);
    for s in [JobStatus::Succeeded, JobStatus::Failed, JobStatus::Stopped] {
        assert!(s.is_terminal());
    }
    assert!(!JobStatus::Pending.is_terminal() && !JobStatus::Running.is_terminal());
}

#[test]
fn job_status_of_a_real_job() {
    // Three instances: one succeeded, one running, one waiting for its retry.
    let mut spec = batch(3, 1_000, 2.0);
    spec.count = 3;
    let mut rec = record(&spec);
    add_claim(&mut rec, 0, "node-a", 0);
    add_run(&mut rec, 0, 0, "node-a", ended(RunStatus::Succeeded, 1, 2, Some(0)));
    add_claim(&mut rec, 1, "node-b", 0);
    add_run(&mut rec, 1, 0, "node-b", running(1));
    add_claim(&mut rec, 2, "node-c", 0);
    add_run(&mut rec, 2, 0, "node-c", ended(RunStatus::Failed, 1, 2, Some(1)));
    let views: Vec<InstanceView> = (0..3).map(|i| eval(&rec, &spec, i, &alive)).collect();
    assert_eq!(
        views.iter().map(|v| v.status).collect::<Vec<_>>(),
        [InstanceStatus::Succeeded, InstanceStatus::Running, InstanceStatus::Pending]
    );
    assert_eq!(job_status(false, &views), JobStatus::Running);
}

// ---------------------------------------------------------------- compaction

#[test]
fn finished_at_is_the_latest_end() {
    let spec = batch(3, 1_000, 2.0);
    let mut rec = record(&spec);
    assert_eq!(finished_at_ms(&rec), 10, "no runs: the submission time");
    add_run(&mut rec, 0, 0, "a", ended(RunStatus::Failed, 100, 300, Some(1)));
    add_run(&mut rec, 0, 1, "a", running(400));
    assert_eq!(finished_at_ms(&rec), 400);
    rec.stops.insert("b".into(), StopRequest { at_ms: 900 });
    assert_eq!(finished_at_ms(&rec), 900);
    assert_eq!(finished_at_ms(&JobRecord::default()), 0);
}

fn finished(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|(t, id)| (*t, id.to_string())).collect()
}

#[test]
fn jobs_to_compact_by_count_keeps_the_newest() {
    let f = finished(&[(500, "e"), (100, "a"), (300, "c"), (200, "b"), (400, "d")]);
    // Age limit far away: only the count applies.
    assert_eq!(jobs_to_compact(&f, 600, 2, u64::MAX), ["a", "b", "c"]);
    assert_eq!(jobs_to_compact(&f, 600, 5, u64::MAX), Vec::<String>::new());
    assert_eq!(jobs_to_compact(&f, 600, 10, u64::MAX), Vec::<String>::new());
    assert_eq!(jobs_to_compact(&f, 600, 0, u64::MAX).len(), 5);
    // Ties on time break by id, so every node drops the same ones.
    let tied = finished(&[(100, "y"), (100, "x"), (100, "z")]);
    assert_eq!(jobs_to_compact(&tied, 100, 1, u64::MAX), ["x", "y"]);
}

#[test]
fn jobs_to_compact_by_age() {
    let f = finished(&[(100, "a"), (200, "b"), (300, "c")]);
    // now 1_200, retain 1_000 ms: "a" is 1_100 old (out), "b" exactly 1_000 (kept), "c" kept.
    assert_eq!(jobs_to_compact(&f, 1_200, 100, 1_000), ["a"]);
    assert_eq!(jobs_to_compact(&f, 1_201, 100, 1_000), ["a", "b"]);
    assert_eq!(jobs_to_compact(&f, 10_000, 100, 1_000), ["a", "b", "c"]);
    // A clock behind the finish time compacts nothing by age.
    assert_eq!(jobs_to_compact(&f, 0, 100, 1_000), Vec::<String>::new());
    // Count and age together: the union.
    assert_eq!(jobs_to_compact(&f, 1_200, 1, 1_000), ["a", "b"]);
}

#[test]
fn jobs_to_compact_ignores_input_order() {
    let a = finished(&[(5, "j5"), (1, "j1"), (3, "j3"), (2, "j2"), (4, "j4")]);
    let mut b = a.clone();
    b.reverse();
    for (count, age) in [(0, 0), (2, u64::MAX), (10, 2), (3, 1)] {
        assert_eq!(jobs_to_compact(&a, 6, count, age), jobs_to_compact(&b, 6, count, age));
    }
}

// ---------------------------------------------------------------- placement

#[test]
fn placement_score_prefers_emptier_nodes_and_is_deterministic() {
    let cap = Resources { cpu_millis: 4_000, memory_mb: 8_192 };
    let empty = Resources::default();
    let half = Resources { cpu_millis: 2_000, memory_mb: 1_000 };
    let full = cap;
    for n in FIVE {
        let s_empty = placement_score(JOB, 0, 0, n, cap, empty);
        let s_half = placement_score(JOB, 0, 0, n, cap, half);
        let s_full = placement_score(JOB, 0, 0, n, cap, full);
        assert!(s_empty > s_half && s_half > s_full && s_full > 0.0, "{n}: {s_empty} {s_half} {s_full}");
        assert_eq!(s_empty, placement_score(JOB, 0, 0, n, cap, empty));
        // The scarcer resource decides: half the CPU used is "half free" whatever the memory.
        let cpu_only = Resources { cpu_millis: 2_000, memory_mb: 0 };
        assert_eq!(s_half, placement_score(JOB, 0, 0, n, cap, cpu_only));
    }
    // A node with no declared capacity still gets a (small) finite score.
    let s = placement_score(JOB, 0, 0, "node-a", Resources::default(), Resources::default());
    assert!(s.is_finite() && s > 0.0);
}
