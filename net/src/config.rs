//! Configuration, the cluster key and node identity persistence.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    net::Ipv4Addr,
    path::Path,
    time::Duration,
};

use libp2p::{identity::Keypair, multiaddr::Protocol, pnet::PreSharedKey, Multiaddr};
use rand::RngCore;

use crate::NetError;

/// Default TCP port of [`NetConfig::listen`].
pub const DEFAULT_PORT: u16 = 7475;
/// Default for [`NetConfig::max_message_bytes`]: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Default for [`NetConfig::outbound_queue`].
pub const DEFAULT_OUTBOUND_QUEUE: usize = 4096;
/// Default for [`NetConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything [`start`](crate::start) needs.
///
/// Build it with [`NetConfig::new`] and adjust the public fields.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The node identity. Its [`PeerId`](crate::PeerId) is the node's address on the mesh.
    pub keypair: Keypair,
    /// TCP multiaddrs to listen on, e.g. `/ip4/0.0.0.0/tcp/7475` (or `/ip4/127.0.0.1/tcp/0`
    /// in tests). Only TCP is supported (the pnet cluster key works on TCP only).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and to keep re-dialling (with backoff) while not connected.
    /// A trailing `/p2p/<peer id>` is optional.
    pub seeds: Vec<Multiaddr>,
    /// Discover (and dial) peers on the local network with mDNS.
    pub mdns: bool,
    /// Pre-shared cluster key. When set, only peers holding the same key can connect.
    pub cluster_key: Option<ClusterKey>,
    /// Maximum size of one message, request or reply payload, both sent and received.
    /// All nodes of a cluster should use the same value. Must be in `1..=u32::MAX`.
    pub max_message_bytes: usize,
    /// Capacity of the bounded command queue from [`NetHandle`](crate::NetHandle) to the
    /// network task. Must be at least 1.
    pub outbound_queue: usize,
    /// How long a request (or one-way message) may stay unanswered on the wire, and how long
    /// the application may take to answer an inbound [`NetEvent::Request`](crate::NetEvent).
    /// It also caps the `timeout` passed to [`NetHandle::request`](crate::NetHandle::request).
    pub request_timeout: Duration,
}

impl NetConfig {
    /// A configuration with sensible defaults: listen on `/ip4/0.0.0.0/tcp/7475`, no seeds,
    /// mDNS on, no cluster key, 16 MiB messages, a 4096-entry outbound queue and a 30 s
    /// request timeout.
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: vec![Multiaddr::empty()
                .with(Protocol::Ip4(Ipv4Addr::UNSPECIFIED))
                .with(Protocol::Tcp(DEFAULT_PORT))],
            seeds: Vec::new(),
            mdns: true,
            cluster_key: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

const KEY_FILE_HEADER: &str = "/key/swarm/psk/1.0.0/";
const KEY_FILE_ENCODING: &str = "/base16/";

/// A cluster key: a libp2p private-network pre-shared key (32 random bytes).
///
/// Every connection is encrypted with it (XSalsa20) before the noise handshake, so nodes
/// without the same key cannot even start a handshake. `Debug` shows only the fingerprint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClusterKey(PreSharedKey);

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(PreSharedKey::new(bytes))
    }

    /// The standard key file format shared with go-libp2p / IPFS:
    /// `"/key/swarm/psk/1.0.0/\n/base16/\n<64 hex chars>\n"`.
    pub fn to_file_string(&self) -> String {
        self.0.to_key_file()
    }

    /// Parses the key file format of [`to_file_string`](Self::to_file_string). Surrounding
    /// whitespace and upper-case hex are accepted; anything else is an error.
    pub fn from_file_string(s: &str) -> Result<Self, NetError> {
        let bad = |why: &str| NetError::InvalidClusterKey(why.to_string());
        let mut lines = s.trim().lines().map(str::trim);
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(bad("first line must be /key/swarm/psk/1.0.0/"));
        }
        if lines.next() != Some(KEY_FILE_ENCODING) {
            return Err(bad("second line must be /base16/"));
        }
        let hex_line = lines.next().ok_or_else(|| bad("missing key line"))?;
        if lines.next().is_some() {
            return Err(bad("unexpected trailing lines"));
        }
        let bytes = hex::decode(hex_line).map_err(|e| bad(&format!("key is not hex: {e}")))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("key must be exactly 32 bytes (64 hex characters)"))?;
        Ok(Self(PreSharedKey::new(bytes)))
    }

    /// A short hex fingerprint that identifies the key without revealing it (the same
    /// fingerprint go-libp2p prints).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    /// The underlying libp2p pre-shared key.
    pub fn psk(&self) -> PreSharedKey {
        self.0
    }
}

impl From<PreSharedKey> for ClusterKey {
    fn from(psk: PreSharedKey) -> Self {
        Self(psk)
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClusterKey").field(&self.fingerprint()).finish()
    }
}

/// Loads the node keypair from `path`, or creates a new ed25519 keypair there.
///
/// The file holds the libp2p protobuf encoding of the keypair. A new file is written
/// atomically (temporary file in the same directory, fsync, rename, fsync of the directory)
/// with mode 0600; missing parent directories are created. An existing file that does not
/// decode is an error, never silently replaced.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, NetError> {
    match fs::read(path) {
        Ok(bytes) => {
            warn_if_world_readable(path);
            Keypair::from_protobuf_encoding(&bytes)
                .map_err(|e| NetError::InvalidKeypair(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding().map_err(|e| NetError::InvalidKeypair(e.to_string()))?;
            write_atomic(path, &bytes)?;
            tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "created node keypair");
            Ok(keypair)
        }
        Err(e) => Err(NetError::Io(e)),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let file_name = path.file_name().ok_or_else(|| NetError::Io(io::Error::other("keypair path has no file name")))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(format!(".tmp.{}.{:08x}", std::process::id(), rand::random::<u32>()));
    let tmp = dir.join(tmp_name);

    let result = (|| -> io::Result<()> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable. Not all platforms can open a directory.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(NetError::Io)
}

fn warn_if_world_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "keypair file is readable by group/others; chmod 600 recommended");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_key_round_trip() {
        let k = ClusterKey::generate();
        let s = k.to_file_string();
        assert!(s.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"));
        let back = ClusterKey::from_file_string(&s).unwrap();
        assert_eq!(back, k);
        assert_eq!(back.fingerprint(), k.fingerprint());
        assert_ne!(ClusterKey::generate(), k);
        // Upper-case hex and missing trailing newline are fine.
        let upper = format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", s.lines().nth(2).unwrap().to_uppercase());
        assert_eq!(ClusterKey::from_file_string(&upper).unwrap(), k);
        // Debug never shows the key.
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(s.lines().nth(2).unwrap()));
    }

    #[test]
    fn malformed_cluster_keys_are_errors() {
        let hex64 = "ab".repeat(32);
        let cases = [
            String::new(),
            "garbage".to_string(),
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", "zz".repeat(32)),
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", "ab".repeat(31)),
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", "ab".repeat(33)),
            // 64 bytes of multi-byte UTF-8 must not panic.
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}", "é".repeat(32)),
            format!("/key/swarm/psk/1.0.0/\n/base64/\n{hex64}"),
            format!("/key/swarm/psk/2.0.0/\n/base16/\n{hex64}"),
            "/key/swarm/psk/1.0.0/\n/base16/\n".to_string(),
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex64}\nextra"),
        ];
        for c in cases {
            assert!(matches!(ClusterKey::from_file_string(&c), Err(NetError::InvalidClusterKey(_))), "accepted {c:?}");
        }
    }
}
