//! Helpers shared by the integration tests: real nodes on 127.0.0.1, mDNS off.

#![allow(dead_code)]

use std::time::Duration;

use colony_net::{start, ClusterKey, Keypair, Multiaddr, NetConfig, NetEvent, NetHandle, PeerId};
use libp2p::multiaddr::Protocol;
use tokio::sync::mpsc::Receiver;

pub struct Node {
    pub net: NetHandle,
    pub events: Receiver<NetEvent>,
    /// `/ip4/127.0.0.1/tcp/PORT/p2p/PEERID`
    pub addr: Multiaddr,
}

impl Node {
    pub fn id(&self) -> PeerId {
        self.net.local_peer_id()
    }
}

pub async fn node(seeds: Vec<Multiaddr>, key: Option<ClusterKey>) -> Node {
    let mut cfg = NetConfig::new(Keypair::generate_ed25519());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.seeds = seeds;
    cfg.mdns = false;
    cfg.cluster_key = key;
    let (net, events) = start(cfg).await.expect("start node");
    let listen = net.listen_addrs().await;
    assert!(!listen.is_empty(), "start() returns only once listening");
    let addr = listen[0].clone().with(Protocol::P2p(net.local_peer_id()));
    Node { net, events, addr }
}

/// Consumes events until `f` returns `Some`, failing the test after `deadline`.
pub async fn wait_for<T>(
    events: &mut Receiver<NetEvent>,
    deadline: Duration,
    what: &str,
    mut f: impl FnMut(NetEvent) -> Option<T>,
) -> T {
    let found = tokio::time::timeout(deadline, async {
        loop {
            let ev = events.recv().await.expect("event channel closed");
            if let Some(t) = f(ev) {
                return t;
            }
        }
    })
    .await;
    match found {
        Ok(t) => t,
        Err(_) => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Waits until `peer` comes up on this node.
pub async fn wait_peer_up(node: &mut Node, peer: PeerId, deadline: Duration) {
    let me = node.id();
    wait_for(&mut node.events, deadline, &format!("{me} to see PeerUp({peer})"), |ev| match ev {
        NetEvent::PeerUp { peer: p, .. } if p == peer => Some(()),
        _ => None,
    })
    .await
}

/// Asserts that for the whole `window` no PeerUp from any of `peers` arrives.
pub async fn assert_no_peer_up(node: &mut Node, peers: &[PeerId], window: Duration) {
    let res = tokio::time::timeout(window, async {
        while let Some(ev) = node.events.recv().await {
            if let NetEvent::PeerUp { peer, .. } = ev {
                if peers.contains(&peer) {
                    return peer;
                }
            }
        }
        futures::future::pending().await
    })
    .await;
    if let Ok(peer) = res {
        panic!("{} unexpectedly connected to {peer}", node.id());
    }
}
