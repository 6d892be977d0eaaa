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
/// session), and the repairs a core asks for stay within `sync_docs_per_round` per interval
/// however many new peers bring eager rounds (a heal brings hundreds).
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
            if matches!(message, Message::Have { reply: true, .. }) {
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
