//! Keypair persistence and cluster key files.

use colony_net::{load_or_create_keypair, ClusterKey, NetError};

#[test]
fn keypair_is_created_once_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("node.key");
    let first = load_or_create_keypair(&path).unwrap();
    let second = load_or_create_keypair(&path).unwrap();
    assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    assert!(first.clone().try_into_ed25519().is_ok(), "ed25519 keypair");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // No temporary files left behind.
    let leftovers: Vec<_> =
        std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("node.key")]);
}

#[test]
fn corrupt_keypair_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    for junk in [&b""[..], b"not a key", &[0xffu8; 68][..]] {
        std::fs::write(&path, junk).unwrap();
        assert!(matches!(load_or_create_keypair(&path), Err(NetError::InvalidKeypair(_))));
        // The bad file is left alone, not replaced.
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }
    // A directory where the file should be is an I/O error.
    assert!(load_or_create_keypair(dir.path()).is_err());
}

#[test]
fn cluster_key_file_round_trip() {
    let key = ClusterKey::generate();
    let text = key.to_file_string();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[0], "/key/swarm/psk/1.0.0/");
    assert_eq!(lines[1], "/base16/");
    assert_eq!(lines[2].len(), 64);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swarm.key");
    std::fs::write(&path, &text).unwrap();
    let back = ClusterKey::from_file_string(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, key);
    assert_eq!(back.fingerprint(), key.fingerprint());
    assert_eq!(key.fingerprint().len(), 32);
}

#[test]
fn malformed_cluster_key_is_an_error() {
    for bad in [
        "",
        "\n\n\n",
        "/key/swarm/psk/1.0.0/\n/base16/\nnothex",
        "/key/swarm/psk/1.0.0/\n/base16/\n0123",
        "/key/swarm/psk/1.0.0/\n/bin/\n00",
        "🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀",
    ] {
        assert!(matches!(ClusterKey::from_file_string(bad), Err(NetError::InvalidClusterKey(_))), "accepted {bad:?}");
    }
}
