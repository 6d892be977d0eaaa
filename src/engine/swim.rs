//! SWIM-style probing with Lifeguard's local health multiplier. Pure bookkeeping: the engine
//! decides whom to probe and writes what enters the table; this module only tracks
//! outstanding probes and deadlines. Probes and acks never enter the CRDT.

use super::config::Timing;
use colony_crdt::NodeId;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Direct,
    Indirect,
}

#[derive(Debug, Clone)]
struct Probe {
    target: NodeId,
    phase: Phase,
    sent_ms: u64,
    deadline_ms: u64,
}

/// What an `Ack` meant.
pub(crate) enum AckOutcome {
    /// We relayed this probe for `origin`: forward the ack with its `seq`.
    Relay { origin: NodeId, seq: u64 },
    /// Our probe of `target` was answered.
    Alive { target: NodeId },
    /// A late or unknown ack.
    Unknown,
}

/// A probe deadline that passed.
pub(crate) enum Expired {
    /// The direct probe went unanswered: ask others to probe (same `seq`).
    NeedIndirect { target: NodeId, seq: u64 },
    /// The indirect probes went unanswered too: suspect `target`.
    Suspect { target: NodeId },
}

pub(crate) struct Swim {
    probe_interval_ms: u64,
    probe_timeout_ms: u64,
    suspicion_ms: u64,
    max_local_health: u32,
    next_probe_ms: u64,
    seq: u64,
    probes: BTreeMap<u64, Probe>,
    probing: BTreeMap<NodeId, u64>,
    relays: BTreeMap<u64, (NodeId, u64, u64)>,
    suspected: BTreeMap<NodeId, u64>,
    local_health: u32,
    /// Smoothed round trip and its mean deviation, in microseconds-free integer ms * 8
    /// (RFC 6298 arithmetic: srtt8 = 8 * SRTT, rttvar4 = 4 * RTTVAR).
    srtt8: Option<u64>,
    rttvar4: u64,
}

impl Swim {
    pub fn new(timing: &Timing, now_ms: u64) -> Swim {
        Swim {
            probe_interval_ms: timing.probe_interval_ms,
            probe_timeout_ms: timing.probe_timeout_ms,
            suspicion_ms: timing.suspicion_ms,
            max_local_health: timing.max_local_health,
            next_probe_ms: now_ms,
            seq: 0,
            probes: BTreeMap::new(),
            probing: BTreeMap::new(),
            relays: BTreeMap::new(),
            suspected: BTreeMap::new(),
            local_health: 0,
            srtt8: None,
            rttvar4: 0,
        }
    }

    fn scale(&self, ms: u64) -> u64 {
        ms * (1 + u64::from(self.local_health))
    }

    /// A probe's timeout: the configured one, or the measured round-trip bound when the
    /// network is slower, stretched by local health.
    fn probe_timeout(&self) -> u64 {
        self.scale(self.probe_timeout_ms.max(self.rtt_bound_ms()))
    }

    /// RFC 6298 smoothing of one round-trip sample.
    fn sample_rtt(&mut self, rtt_ms: u64) {
        match self.srtt8 {
            None => {
                self.srtt8 = Some(rtt_ms * 8);
                self.rttvar4 = rtt_ms * 2;
            }
            Some(srtt8) => {
                let srtt = srtt8 / 8;
                let err = srtt.abs_diff(rtt_ms);
                self.rttvar4 = self.rttvar4 - self.rttvar4 / 4 + err;
                self.srtt8 = Some(srtt8 - srtt8 / 8 + rtt_ms);
            }
        }
    }

    /// SRTT + 4 RTTVAR: a round trip that is rarely exceeded (0 before any sample).
    pub fn rtt_bound_ms(&self) -> u64 {
        self.srtt8.map_or(0, |s| s / 8 + self.rttvar4)
    }

    /// The local health multiplier (0 = healthy).
    pub fn local_health(&self) -> u32 {
        self.local_health
    }

    pub fn next_deadline_ms(&self) -> u64 {
        let mut t = self.next_probe_ms;
        for p in self.probes.values() {
            t = t.min(p.deadline_ms);
        }
        for (_, _, deadline) in self.relays.values() {
            t = t.min(*deadline);
        }
        for since in self.suspected.values() {
            t = t.min(since + self.scale(self.suspicion_ms));
        }
        t
    }

    pub fn probe_due(&mut self, now_ms: u64) -> bool {
        if now_ms < self.next_probe_ms {
            return false;
        }
        self.next_probe_ms = now_ms + self.probe_interval_ms;
        true
    }

    /// Starts a direct probe of `target` unless one is outstanding. Returns its seq.
    pub fn start_probe(&mut self, now_ms: u64, target: &str) -> Option<u64> {
        if self.probing.contains_key(target) {
            return None;
        }
        self.seq += 1;
        let seq = self.seq;
        let deadline_ms = now_ms + self.probe_timeout();
        self.probes
            .insert(seq, Probe { target: target.to_string(), phase: Phase::Direct, sent_ms: now_ms, deadline_ms });
        self.probing.insert(target.to_string(), seq);
        Some(seq)
    }

    /// Registers a probe made on `origin`'s behalf; returns the seq to ping the target with.
    pub fn start_relay(&mut self, now_ms: u64, origin: &str, origin_seq: u64) -> u64 {
        self.seq += 1;
        let deadline = now_ms + self.probe_timeout() * 2;
        self.relays.insert(self.seq, (origin.to_string(), origin_seq, deadline));
        self.seq
    }

    /// An `Ack` with `seq` arrived from `from`.
    pub fn on_ack(&mut self, now_ms: u64, seq: u64, from: &str) -> AckOutcome {
        if let Some((origin, origin_seq, _)) = self.relays.remove(&seq) {
            return AckOutcome::Relay { origin, seq: origin_seq };
        }
        let Some(probe) = self.probes.remove(&seq) else { return AckOutcome::Unknown };
        // The target's own answer is a round-trip sample, late ones too: they are what
        // stretches the timeouts on a slow network. An answer relayed by an indirect prober
        // is not (Karn's rule): it includes the direct timeout, so it would raise the timeout,
        // which raises the next sample, without bound, whenever a watched node is reachable
        // only through others (seen as multi-second settle windows on a partial mesh).
        if from == probe.target {
            self.sample_rtt(now_ms.saturating_sub(probe.sent_ms));
        }
        self.probing.remove(&probe.target);
        self.suspected.remove(&probe.target);
        self.local_health = self.local_health.saturating_sub(1);
        AckOutcome::Alive { target: probe.target }
    }

    pub fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        let mut out = Vec::new();
        let due: Vec<u64> = self.probes.iter().filter(|(_, p)| p.deadline_ms <= now_ms).map(|(s, _)| *s).collect();
        for seq in due {
            let Some(probe) = self.probes.get(&seq).cloned() else { continue };
            match probe.phase {
                Phase::Direct => {
                    // Lifeguard: a missed answer is first a hint that *we* are slow.
                    self.local_health = (self.local_health + 1).min(self.max_local_health);
                    let deadline_ms = now_ms + self.probe_timeout() * 2;
                    self.probes.insert(seq, Probe { phase: Phase::Indirect, deadline_ms, ..probe.clone() });
                    out.push(Expired::NeedIndirect { target: probe.target, seq });
                }
                Phase::Indirect => {
                    self.probes.remove(&seq);
                    self.probing.remove(&probe.target);
                    self.suspected.entry(probe.target.clone()).or_insert(now_ms);
                    out.push(Expired::Suspect { target: probe.target });
                }
            }
        }
        self.relays.retain(|_, (_, _, deadline)| *deadline > now_ms);
        out
    }

    /// Suspects whose suspicion timed out without an answer: to be certified dead. Each is
    /// returned once.
    pub fn suspicions_due(&mut self, now_ms: u64) -> Vec<NodeId> {
        let timeout = self.scale(self.suspicion_ms);
        let due: Vec<NodeId> =
            self.suspected.iter().filter(|(_, since)| now_ms >= **since + timeout).map(|(t, _)| t.clone()).collect();
        for t in &due {
            self.suspected.remove(t);
        }
        due
    }

    /// Forgets a target (it refuted, left, or is no longer watched).
    pub fn forget(&mut self, target: &str) {
        self.suspected.remove(target);
        if let Some(seq) = self.probing.remove(target) {
            self.probes.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_targets_own_answer_is_a_round_trip_sample() {
        let mut swim = Swim::new(&Timing::default(), 0);
        let seq = swim.start_probe(0, "b").expect("not probing b yet");
        assert!(matches!(swim.on_ack(2, seq, "b"), AckOutcome::Alive { .. }));
        let bound = swim.rtt_bound_ms();
        assert!(bound > 0 && bound < 20, "one 2 ms sample gives a small bound, got {bound}");
        // A watched node reachable only through other nodes: every answer is relayed and
        // arrives after the direct timeout. None of them may move the estimate, or the
        // timeout and the settle window ratchet up without bound.
        let mut now = 10;
        for _ in 0..50 {
            let seq = swim.start_probe(now, "c").expect("the last probe of c ended");
            assert!(matches!(swim.on_ack(now + 400, seq, "helper"), AckOutcome::Alive { .. }));
            now += 1_000;
        }
        assert_eq!(swim.rtt_bound_ms(), bound);
        // A late answer from the target itself still counts: that is how a slow network
        // stretches the timeouts.
        let seq = swim.start_probe(now, "b").expect("not probing b");
        swim.on_ack(now + 300, seq, "b");
        assert!(swim.rtt_bound_ms() > bound);
    }
}
