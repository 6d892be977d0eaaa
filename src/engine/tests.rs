/// The documents an anti-entropy round syncs past its cap are a uniform choice: over many
/// rounds every document is chosen about equally often, the last in id order as often as the
/// first (a sample that kept the front of the list starved the rest).
#[test]
fn capped_anti_entropy_rounds_choose_every_document_alike() {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut chosen = [0u32; 1000];
    for _ in 0..200 {
        let sample = super::sample_sorted(&mut rng, (0..1000usize).collect(), 100);
        assert_eq!(sample.len(), 100);
        assert!(sample.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        for i in sample {
            chosen[i] += 1;
        }
    }
    // 200 rounds of 100 of 1,000: each document about 20 times.
    let (front, back) = (chosen[..100].iter().sum::<u32>(), chosen[900..].iter().sum::<u32>());
    assert!((1_500..2_500).contains(&front), "first hundred chosen {front} times");
    assert!((1_500..2_500).contains(&back), "last hundred chosen {back} times");
    assert!(chosen.iter().all(|c| *c > 0), "every document chosen at least once");
    assert_eq!(super::sample_sorted(&mut rng, vec![3, 1, 2], 5), vec![3, 1, 2], "under the cap: all, as given");
}

/// Node cores that never got each other's pushes converge through anti-entropy alone: node
/// and job documents are both repaired by `Have` (a core never starts an Automerge sync
/// session), and the job documents a core asks to repair stay within `sync_docs_per_round`
/// per interval however many new peers bring eager rounds (a heal brings hundreds). Node
/// documents are repaired first and outside the budget.
#[test]
fn anti_entropy_repairs_every_document_by_have_within_the_interval_budget() {
    use super::{Engine, EngineConfig, Message, Output};
    use colony_crdt::{JobSpec, Resources};
    use std::collections::VecDeque;

    const BUDGET: usize = 3;
    const N: usize = 4;
    let id = |i: usize| format!("node-{i}");
    // No capacity: nobody claims, so after the submissions nothing changes and every message
    // after the first step is anti-entropy (or a probe).
    let mut nodes: Vec<Engine> = (0..N)
        .map(|i| {
            let mut config = EngineConfig::new(id(i), Resources::default());
            config.limits.sync_docs_per_round = BUDGET;
            Engine::new(id(i), config, i as u64, 0, None).expect("starts")
        })
        .collect();
    for (i, node) in nodes.iter_mut().enumerate() {
        for j in 0..4 {
            node.submit(0, JobSpec::command("true", [format!("{i}-{j}")])).expect("a valid spec");
        }
    }
    // Meet, and lose every message of that step: the node documents' pushes among them.
    for (i, node) in nodes.iter_mut().enumerate() {
        for peer in (0..N).filter(|p| *p != i) {
            node.handle_peer_up(0, id(peer));
        }
        while node.poll_output().is_some() {}
    }
    let index = |name: &str| (0..N).find(|i| id(*i) == name).expect("a known node");
    let mut asked = [0usize; N]; // `Have`s that start a repair, by sender
    let mut converged_at = None;
    for now in (0..30_000).step_by(10) {
        let mut queue: VecDeque<(usize, usize, Message)> = VecDeque::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            node.handle_timeout(now);
            while let Some(out) = node.poll_output() {
                if let Output::Send { to, message } = out {
                    queue.push_back((i, index(&to), message));
                }
            }
        }
        while let Some((from, to, message)) = queue.pop_front() {
            assert!(!matches!(message, Message::Sync { .. }), "a core started a sync session");
            if matches!(message, Message::Have { reply: true, doc: colony_crdt::DocId::Job(_), .. }) {
                asked[from] += 1;
            }
            nodes[to].handle_message(now, &id(from), message);
            while let Some(out) = nodes[to].poll_output() {
                if let Output::Send { to: next, message } = out {
                    queue.push_back((to, index(&next), message));
                }
            }
        }
        // One interval's budget for the eager rounds with the three new peers and the regular
        // round together: a budget per round would allow three times as much by 300 ms.
        let intervals = now as usize / 1_000 + 2;
        assert!(asked.iter().all(|a| *a <= BUDGET * intervals), "asked for {asked:?} repairs by {now} ms");
        if nodes.iter().all(|n| n.digest() == nodes[0].digest()) {
            converged_at = Some(now);
            break;
        }
    }
    let at = converged_at.expect("converged through anti-entropy alone");
    assert!(at >= 1_000, "20 documents differ, 3 an interval: converged at {at} ms, faster than the budget allows");
    for node in &nodes {
        assert_eq!(node.table().jobs().count(), 4 * N, "every job on every node");
        assert_eq!(node.table().nodes().count(), N, "every node document on every node");
    }
}

/// Four node cores, split {w, z} | {p, q} while w runs a job's one instance. Each side
/// certifies the other dead, and p's side runs the instance again. The cut then heals for z
/// first: z learns by anti-entropy that w, which it never stopped seeing, was certified dead,
/// while w still cannot hear it from the other side. z passes the certificate on to w, w
/// refutes, and z does not claim the instance meanwhile: before the forwarding, z found it
/// without a valid claim (w and p both certified dead in its view) and claimed it afresh,
/// one more copy for every such instance at a heal. After the whole cut heals, one copy
/// runs, on the winner.
#[test]
fn a_certificate_from_across_a_healed_cut_waits_for_the_refutation() {
    use super::{Engine, EngineConfig, Message, Output};
    use colony_crdt::{JobSpec, Resources};
    use std::collections::VecDeque;

    const N: usize = 4;
    let id = |i: usize| format!("node-{i}");
    let index = |name: &str| (0..N).find(|i| id(*i) == name).expect("a known node");
    let capacity = Resources { cpu_millis: 4_000, memory_mb: 4_096 };
    let mut nodes: Vec<Engine> = (0..N)
        .map(|i| Engine::new(id(i), EngineConfig::new(id(i), capacity), i as u64, 0, None).expect("starts"))
        .collect();
    // Tasks running on each node, by task id; a task never exits by itself here.
    let mut running: Vec<std::collections::BTreeSet<String>> = vec![Default::default(); N];
    // Delivers every output at `now`, dropping messages across `cut`, until quiet.
    let step = |nodes: &mut Vec<Engine>,
                running: &mut Vec<std::collections::BTreeSet<String>>,
                now: u64,
                cut: &dyn Fn(usize, usize) -> bool| {
        let mut queue: VecDeque<(usize, usize, Message)> = VecDeque::new();
        let mut drain = |i: usize, node: &mut Engine, queue: &mut VecDeque<(usize, usize, Message)>| {
            while let Some(out) = node.poll_output() {
                match out {
                    Output::Send { to, message } => queue.push_back((i, index(&to), message)),
                    Output::StartTask(start) => {
                        running[i].insert(start.task.clone());
                    }
                    Output::StopTask { task } => {
                        running[i].remove(&task);
                        node.handle_task_exited(now, &task, 143);
                    }
                    _ => {}
                }
            }
        };
        for (i, node) in nodes.iter_mut().enumerate() {
            node.handle_timeout(now);
            drain(i, node, &mut queue);
        }
        while let Some((from, to, message)) = queue.pop_front() {
            if cut(from, to) {
                continue;
            }
            nodes[to].handle_message(now, &id(from), message);
            drain(to, &mut nodes[to], &mut queue);
        }
    };
    let whole = |_: usize, _: usize| false;
    for (i, node) in nodes.iter_mut().enumerate() {
        for peer in (0..N).filter(|p| *p != i) {
            node.handle_peer_up(0, id(peer));
        }
    }
    nodes[0].submit(0, JobSpec::command("sleep", ["1000"])).expect("a valid spec");
    let mut now = 0;
    while now < 3_000 {
        step(&mut nodes, &mut running, now, &whole);
        now += 10;
    }
    let w = running.iter().position(|r| !r.is_empty()).expect("the instance runs somewhere");
    let others: Vec<usize> = (0..N).filter(|i| *i != w).collect();
    let (z, p, q) = (others[0], others[1], others[2]);
    let side = move |i: usize| i == w || i == z;

    // The split: each side certifies the other dead; p's side runs the instance again.
    let split = move |a: usize, b: usize| side(a) != side(b);
    while now < 10_000 {
        step(&mut nodes, &mut running, now, &split);
        now += 10;
    }
    assert!(running[p].len() + running[q].len() == 1, "the other side runs the instance too: {running:?}");
    assert_eq!(running[w].len(), 1, "w still runs its copy: {running:?}");
    let z_claims = nodes[z].counters().claims;

    // z meets p and q again; w does not yet.
    let partial = move |a: usize, b: usize| split(a, b) && (a == w || b == w);
    while now < 14_000 {
        step(&mut nodes, &mut running, now, &partial);
        now += 10;
    }
    assert!(nodes[z].counters().certificates_forwarded > 0, "z passed a certificate against w on to w");
    assert!(nodes[w].counters().refutations > 0, "w refuted the certificate it heard of from z");
    assert_eq!(nodes[z].counters().claims, z_claims, "z claimed nothing while w's refutation was due");
    assert!(running[z].is_empty(), "z runs no copy: {running:?}");

    // The whole cut heals: one copy runs, on the node every core names as the owner.
    let mut converged = false;
    while now < 30_000 && !converged {
        step(&mut nodes, &mut running, now, &whole);
        now += 10;
        converged = nodes.iter().all(|n| n.digest() == nodes[0].digest())
            && running.iter().map(|r| r.len()).sum::<usize>() == 1;
    }
    assert!(converged, "one digest and one running copy after the heal: {running:?}");
}

/// Nodes past `max_claim_rank` still claim one after another when the better-ranked nodes do
/// not claim (here: nobody hears anybody's claim). They used to wait the same `cap` steps and
/// claim in the same instant: at hundreds of nodes, hundreds of claims on one instance, each
/// pushed to every node.
#[test]
fn nodes_past_the_rank_cap_claim_one_after_another() {
    use super::{Engine, EngineConfig, Output};
    use colony_crdt::{JobSpec, Resources};
    use std::collections::{BTreeMap, VecDeque};

    const N: usize = 13;
    const STAGGER: u64 = 50;
    let id = |i: usize| format!("node-{i}");
    let index = |name: &str| (0..N).find(|i| id(*i) == name).expect("a known node");
    let mut nodes: Vec<Engine> = (0..N)
        .map(|i| {
            // Node 0 takes the submission and has no room, so it claims nothing itself.
            let capacity =
                if i == 0 { Resources::default() } else { Resources { cpu_millis: 4_000, memory_mb: 4_096 } };
            let mut config = EngineConfig::new(id(i), capacity);
            config.timing.max_claim_rank = 2;
            config.timing.claim_stagger_ms = STAGGER;
            config.timing.probe_interval_ms = 3_600_000; // no suspicions while nobody hears anybody
            Engine::new(id(i), config, i as u64, 0, None).expect("starts")
        })
        .collect();
    // Everybody meets and learns everybody's node document; then the submission reaches
    // everybody, and from then on every message is lost.
    let deliver = |nodes: &mut Vec<Engine>, now: u64, tick: bool| {
        let mut queue: VecDeque<(usize, usize, super::Message)> = VecDeque::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            if tick {
                node.handle_timeout(now);
            }
            while let Some(out) = node.poll_output() {
                if let Output::Send { to, message } = out {
                    queue.push_back((i, index(&to), message));
                }
            }
        }
        while let Some((from, to, message)) = queue.pop_front() {
            nodes[to].handle_message(now, &id(from), message);
            while let Some(out) = nodes[to].poll_output() {
                if let Output::Send { to: next, message } = out {
                    queue.push_back((to, index(&next), message));
                }
            }
        }
    };
    for (i, node) in nodes.iter_mut().enumerate() {
        for peer in (0..N).filter(|p| *p != i) {
            node.handle_peer_up(0, id(peer));
        }
    }
    let mut now = 0;
    while nodes.iter().any(|n| n.table().nodes().count() < N) {
        assert!(now < 30_000, "node documents did not spread");
        deliver(&mut nodes, now, true);
        now += 10;
    }
    // A node that failed the instance where the job wants another node waits longest.
    let instance = colony_crdt::rules::instance_key("some-job", 0, 0);
    let last = 2 + 8 - 1; // cap 2, then min(12 others - 2, 4 × 2) positions
    assert_eq!(nodes[1].past_cap_position(instance, 2, true), last);
    let positions: Vec<u32> = nodes.iter().map(|n| n.past_cap_position(instance, 2, false)).collect();
    assert!(positions.iter().all(|p| (2..=last).contains(p)), "positions past the window: {positions:?}");
    let mut spec = JobSpec::command("true", ["x"]);
    spec.resources = Resources { cpu_millis: 100, memory_mb: 64 };
    nodes[0].submit(now, spec).expect("a valid spec");
    // The submission's push only: whoever claims at once (the best node) is not heard.
    let pushes: Vec<(String, super::Message)> = std::iter::from_fn(|| nodes[0].poll_output())
        .filter_map(|out| match out {
            Output::Send { to, message } => Some((to, message)),
            _ => None,
        })
        .collect();
    for (to, message) in pushes {
        let to = index(&to);
        nodes[to].handle_message(now, &id(0), message);
    }
    let start = now;
    let mut claimed_at: BTreeMap<usize, u64> = BTreeMap::new();
    for now in start..=start + (N as u64 + 4) * STAGGER {
        for (i, node) in nodes.iter_mut().enumerate() {
            node.handle_timeout(now);
            while node.poll_output().is_some() {}
            if node.counters().claims > 0 {
                claimed_at.entry(i).or_insert(now - start);
            }
        }
    }
    assert_eq!(claimed_at.len(), N - 1, "every node with room claims in the end: {claimed_at:?}");
    let mut per_instant: BTreeMap<u64, usize> = BTreeMap::new();
    for at in claimed_at.values() {
        *per_instant.entry(*at).or_default() += 1;
    }
    let most = per_instant.values().copied().max().unwrap_or(0);
    assert!(most <= 3, "{most} nodes claimed in one instant: {per_instant:?}");
    assert!(per_instant.len() >= (N - 1) / 2, "claims spread over few instants: {per_instant:?}");
    // The back-off past the cap stays within its window: 2 + 8 positions here, not 12.
    let bound = (1 + super::PAST_CAP_SLOTS as u64) * 2 * STAGGER;
    assert!(per_instant.keys().all(|at| *at < bound), "a claim waited past {bound} ms: {per_instant:?}");
}
