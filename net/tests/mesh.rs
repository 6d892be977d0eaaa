//! End-to-end tests over real TCP sockets on 127.0.0.1 (no mocks, mDNS off).

mod common;

use std::time::Duration;

use colony_net::{ClusterKey, NetError, NetEvent, DEFAULT_MAX_MESSAGE_BYTES};
use common::{assert_no_peer_up, node, wait_for, wait_peer_up};
use rand::RngCore;

const DEADLINE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_message_request_and_large_payload() {
    let mut a = node(vec![], None).await;
    let mut b = node(vec![a.addr.clone()], None).await;
    let (a_id, b_id) = (a.id(), b.id());

    wait_peer_up(&mut a, b_id, DEADLINE).await;
    wait_peer_up(&mut b, a_id, DEADLINE).await;
    assert!(a.net.connected_peers().await.contains(&b_id));
    assert!(b.net.connected_peers().await.contains(&a_id));

    // One-way B → A, byte-identical (including all byte values and an empty message). Each
    // message travels on its own stream, so the two may arrive in either order.
    let msg: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    b.net.try_send(a_id, msg.clone()).unwrap();
    b.net.try_send(a_id, Vec::new()).unwrap();
    let mut got = Vec::new();
    for what in ["first message B→A", "second message B→A"] {
        got.push(
            wait_for(&mut a.events, DEADLINE, what, |ev| match ev {
                NetEvent::Message { from, bytes } if from == b_id => Some(bytes),
                _ => None,
            })
            .await,
        );
    }
    got.sort();
    assert_eq!(got, vec![Vec::new(), msg]);

    // Request A → B, answered by B's application.
    let a_net = a.net.clone();
    let pending = tokio::spawn(async move { a_net.request(b_id, b"ping".to_vec(), Duration::from_secs(5)).await });
    wait_for(&mut b.events, DEADLINE, "request A→B", |ev| match ev {
        NetEvent::Request { from, bytes, reply } if from == a_id => {
            assert_eq!(bytes, b"ping");
            reply.send(b"pong".to_vec()).unwrap();
            Some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(pending.await.unwrap().unwrap(), b"pong");

    // A request whose reply sender is dropped fails instead of hanging.
    let a_net = a.net.clone();
    let pending = tokio::spawn(async move { a_net.request(b_id, b"ignored".to_vec(), Duration::from_secs(5)).await });
    wait_for(&mut b.events, DEADLINE, "request to drop", |ev| match ev {
        NetEvent::Request { reply, .. } => {
            drop(reply);
            Some(())
        }
        _ => None,
    })
    .await;
    assert!(pending.await.unwrap().is_err());

    // 5 MiB B → A.
    let mut big = vec![0u8; 5 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut big);
    b.net.try_send(a_id, big.clone()).unwrap();
    let got = wait_for(&mut a.events, DEADLINE, "5 MiB message", |ev| match ev {
        NetEvent::Message { from, bytes } if from == b_id => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(got.len(), big.len());
    assert!(got == big, "5 MiB payload differs");

    // Oversized payloads are refused locally.
    let err = b.net.try_send(a_id, vec![0; DEFAULT_MAX_MESSAGE_BYTES + 1]).unwrap_err();
    assert!(matches!(err, NetError::MessageTooLarge { .. }), "{err}");

    // Shutdown: B goes down on A, and B's handle reports Shutdown.
    b.net.shutdown().await;
    wait_for(&mut a.events, DEADLINE, "PeerDown(B)", |ev| match ev {
        NetEvent::PeerDown { peer } if peer == b_id => Some(()),
        _ => None,
    })
    .await;
    assert!(b.net.listen_addrs().await.is_empty());
    assert!(b.net.connected_peers().await.is_empty());
    assert!(matches!(b.net.try_send(a_id, b"x".to_vec()), Err(NetError::Shutdown)));
    assert!(matches!(a.net.try_send(b_id, b"x".to_vec()), Err(NetError::NotConnected(_))));
    a.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kademlia_connects_a_chain_into_a_mesh() {
    let mut a = node(vec![], None).await;
    let mut b = node(vec![a.addr.clone()], None).await;
    wait_peer_up(&mut b, a.id(), DEADLINE).await;
    // C only knows B; it must find A through Kademlia.
    let mut c = node(vec![b.addr.clone()], None).await;
    wait_peer_up(&mut c, a.id(), DEADLINE).await;
    wait_peer_up(&mut a, c.id(), DEADLINE).await;

    // And the A–C link carries traffic.
    c.net.try_send(a.id(), b"via kad".to_vec()).unwrap();
    let c_id = c.id();
    let got = wait_for(&mut a.events, DEADLINE, "message C→A", |ev| match ev {
        NetEvent::Message { from, bytes } if from == c_id => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(got, b"via kad");
    for n in [&a, &b, &c] {
        n.net.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_key_keeps_outsiders_out() {
    let k = ClusterKey::generate();
    let other = ClusterKey::generate();
    let mut a = node(vec![], Some(k)).await;
    let mut b = node(vec![a.addr.clone()], Some(k)).await;
    let mut c = node(vec![a.addr.clone()], Some(other)).await;
    let mut d = node(vec![a.addr.clone()], None).await;
    let (a_id, b_id, c_id, d_id) = (a.id(), b.id(), c.id(), d.id());

    wait_peer_up(&mut a, b_id, DEADLINE).await;
    wait_peer_up(&mut b, a_id, DEADLINE).await;

    // C and D keep re-dialling A (seed retry) during this window; none may get through.
    let window = Duration::from_secs(3);
    let (outsiders, only_a) = ([c_id, d_id], [a_id]);
    tokio::join!(
        assert_no_peer_up(&mut a, &outsiders, window),
        assert_no_peer_up(&mut c, &only_a, window),
        assert_no_peer_up(&mut d, &only_a, window),
    );

    for outsider in [c_id, d_id] {
        assert!(matches!(a.net.try_send(outsider, b"secret".to_vec()), Err(NetError::NotConnected(_))));
        assert!(a.net.request(outsider, b"secret".to_vec(), Duration::from_secs(1)).await.is_err());
    }
    assert!(c.net.try_send(a_id, b"let me in".to_vec()).is_err());
    assert!(d.net.try_send(a_id, b"let me in".to_vec()).is_err());
    assert_eq!(a.net.connected_peers().await, vec![b_id]);

    // Members still talk.
    b.net.try_send(a_id, b"member".to_vec()).unwrap();
    let got = wait_for(&mut a.events, DEADLINE, "member message", |ev| match ev {
        NetEvent::Message { from, bytes } if from == b_id => Some(bytes),
        _ => None,
    })
    .await;
    assert_eq!(got, b"member");
    for n in [&a, &b, &c, &d] {
        n.net.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_before_its_seed_still_joins() {
    // Reserve a port for A by starting it, learning its address, and restarting it on the
    // same port with the same identity after B is already trying.
    use colony_net::{start, Keypair, NetConfig};
    let kp = Keypair::generate_ed25519();
    let a_id = kp.public().to_peer_id();
    let probe = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let a_addr: colony_net::Multiaddr = format!("/ip4/127.0.0.1/tcp/{probe}/p2p/{a_id}").parse().unwrap();
    let mut b = node(vec![a_addr], None).await;
    // B's first dial fails (nothing listens); now bring A up.
    let mut cfg = NetConfig::new(kp);
    cfg.listen = vec![format!("/ip4/127.0.0.1/tcp/{probe}").parse().unwrap()];
    cfg.mdns = false;
    let (a_net, mut a_events) = start(cfg).await.expect("start A");
    wait_for(&mut a_events, DEADLINE, "A sees B", |ev| match ev {
        NetEvent::PeerUp { .. } => Some(()),
        _ => None,
    })
    .await;
    wait_peer_up(&mut b, a_id, DEADLINE).await;
    a_net.shutdown().await;
    b.net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_messages_is_delivered_completely() {
    // Far more messages than the per-peer in-flight limit: the sender backs off on
    // QueueFull, and nothing may be lost to stream limits on either side.
    const N: u32 = 2000;
    let mut a = node(vec![], None).await;
    let mut b = node(vec![a.addr.clone()], None).await;
    let (a_id, b_id) = (a.id(), b.id());
    wait_peer_up(&mut b, a_id, DEADLINE).await;

    let sender = b.net.clone();
    let send_all = tokio::spawn(async move {
        let mut queue_full = 0u32;
        for i in 0..N {
            loop {
                match sender.try_send(a_id, i.to_be_bytes().to_vec()) {
                    Ok(()) => break,
                    Err(NetError::QueueFull) => {
                        queue_full += 1;
                        tokio::task::yield_now().await;
                    }
                    Err(e) => panic!("send {i}: {e}"),
                }
            }
        }
        queue_full
    });

    let mut seen = vec![false; N as usize];
    let mut count = 0;
    wait_for(&mut a.events, Duration::from_secs(9), "all burst messages", |ev| {
        if let NetEvent::Message { from, bytes } = ev {
            assert_eq!(from, b_id);
            let i = u32::from_be_bytes(bytes.try_into().expect("4-byte payload")) as usize;
            assert!(!seen[i], "message {i} delivered twice");
            seen[i] = true;
            count += 1;
        }
        (count == N).then_some(())
    })
    .await;
    let queue_full = send_all.await.unwrap();
    eprintln!("QueueFull back-offs during burst: {queue_full}");
    a.net.shutdown().await;
    b.net.shutdown().await;
}

/// Two nodes that dial each other at the same instant (as two agents do when mDNS answers
/// cross) must end up connected. With TCP port reuse both dials shared one 4-tuple, became a
/// TCP simultaneous open with two Noise initiators, and both failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dials_connect() {
    for round in 0..20 {
        let mut a = node(vec![], None).await;
        let mut b = node(vec![], None).await;
        let (a_id, b_id) = (a.id(), b.id());
        a.net.dial(b.addr.clone()).unwrap();
        b.net.dial(a.addr.clone()).unwrap();
        tokio::time::timeout(DEADLINE, async {
            wait_peer_up(&mut a, b_id, DEADLINE).await;
            wait_peer_up(&mut b, a_id, DEADLINE).await;
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: simultaneous dials did not connect"));
        // The connection carries traffic both ways.
        a.net.try_send(b_id, vec![1]).unwrap();
        b.net.try_send(a_id, vec![2]).unwrap();
        for (me, from) in [(&mut b, a_id), (&mut a, b_id)] {
            wait_for(&mut me.events, DEADLINE, "message over the crossed connection", |ev| match ev {
                NetEvent::Message { from: f, .. } if f == from => Some(()),
                _ => None,
            })
            .await;
        }
        a.net.shutdown().await;
        b.net.shutdown().await;
    }
}
