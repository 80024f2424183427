//! The idempotency key of a reserve whose three parts (user, req, SKU) are each at most 16
//! bytes, the usual case, hashed straight from the strings: each part is read as two
//! overlapping little-endian words that, with its length, determine it, and the six words
//! and the lengths are mixed by folded multiplies with per-`Inventory` random seeds (the
//! construction foldhash uses for short inputs). It owns nothing but the seeds; it must not
//! be used for anything that outlives the process (the seeds change at every start, so a
//! key is never stored) and must not allocate.
//!
//! Before the thirteenth round every key was packed into a zeroed buffer (a `memset` and
//! three `memcpy` calls) and hashed twice over it (foldhash, FxHash): ~135 instructions a
//! reserve under callgrind. Longer parts still take that path (`Inventory::idem_key`).
//!
//! It also owns `same_bytes`, the same two-word reading used as a comparison (an inline SKU
//! in the product table, the owner check of a release), in place of `memcmp` calls.

use super::shard::IdemKey;

/// Longest part hashed here.
const SHORT_PART: usize = 16;

/// The multiplier of the check hash (rustc-hash's, an odd constant with well-spread bits).
const CHECK_K: u64 = 0xf135_7aea_2e62_a9c5;

/// The 8 bytes of `b` from `at` as a little-endian word (0 if `b` is shorter).
#[inline]
fn word8(b: &[u8], at: usize) -> u64 {
    b.get(at..at.wrapping_add(8))
        .and_then(|w| <[u8; 8]>::try_from(w).ok())
        .map_or(0, u64::from_le_bytes)
}

/// The 4 bytes of `b` from `at` as a little-endian word (0 if `b` is shorter).
#[inline]
fn word4(b: &[u8], at: usize) -> u32 {
    b.get(at..at.wrapping_add(4))
        .and_then(|w| <[u8; 4]>::try_from(w).ok())
        .map_or(0, u32::from_le_bytes)
}

/// Whether `a` and `b` hold the same bytes: for 4 to 16 bytes as two overlapping words a
/// side (the first and last 8, or 4), which cover every byte, instead of a `memcmp` call;
/// other lengths as slices.
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let len = a.len();
    if len != b.len() {
        return false;
    }
    if (8..=SHORT_PART).contains(&len) {
        word8(a, 0) == word8(b, 0) && word8(a, len - 8) == word8(b, len - 8)
    } else if (4..8).contains(&len) {
        word4(a, 0) == word4(b, 0) && word4(a, len - 4) == word4(b, len - 4)
    } else {
        a == b
    }
}

/// Two words that, with `s.len()` (at most `SHORT_PART`), determine `s`: its first and last
/// 8 bytes (overlapping when shorter than 16), its first and last 4 when shorter than 8,
/// its first, middle and last byte when shorter than 4.
#[inline]
fn ends(s: &[u8]) -> (u64, u64) {
    let len = s.len();
    if len >= 8 {
        (word8(s, 0), word8(s, len - 8))
    } else if len >= 4 {
        (u64::from(word4(s, 0)), u64::from(word4(s, len - 4)))
    } else if len > 0 {
        let byte = |i: usize| u64::from(s.get(i).copied().unwrap_or(0));
        (byte(0) | (byte(len / 2) << 8) | (byte(len - 1) << 16), 0)
    } else {
        (0, 0)
    }
}

/// The 128-bit product of `a` and `b`, its halves xored.
#[inline]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

/// Seeds of the short-key hash, drawn from the OS random source.
pub(crate) struct ShortKeys {
    seeds: [u64; 8],
}

impl ShortKeys {
    pub(crate) fn random() -> ShortKeys {
        ShortKeys {
            seeds: std::array::from_fn(|_| rand::random()),
        }
    }

    /// The key of (user, req, sku), or `None` if a part is longer than `SHORT_PART`. `key`
    /// is keyed (a client that does not know the seeds cannot aim collisions at the index);
    /// `check` is an unkeyed multiply-rotate hash of the same words, stored in the record.
    #[inline]
    pub(crate) fn key(&self, user: &str, req: &str, sku: &str) -> Option<IdemKey> {
        let (user, req, sku) = (user.as_bytes(), req.as_bytes(), sku.as_bytes());
        if user.len() > SHORT_PART || req.len() > SHORT_PART || sku.len() > SHORT_PART {
            return None;
        }
        let (u0, u1) = ends(user);
        let (r0, r1) = ends(req);
        let (k0, k1) = ends(sku);
        // Each at most 16: the three lengths fit a byte each.
        let lens = (user.len() | (req.len() << 8) | (sku.len() << 16)) as u64;
        let s = &self.seeds;
        let a = folded_multiply(u0 ^ s[0], u1 ^ s[1]);
        let b = folded_multiply(r0 ^ s[2], r1 ^ s[3]);
        let c = folded_multiply(k0 ^ s[4], k1 ^ s[5]);
        let key = folded_multiply(a ^ c.rotate_left(29) ^ s[6], b ^ lens ^ s[7]);
        let mut check = lens.wrapping_mul(CHECK_K);
        for w in [u0, u1, r0, r1, k0, k1] {
            check = (check.rotate_left(26) ^ w).wrapping_mul(CHECK_K);
        }
        Some(IdemKey { key, check })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// A part's words and length tell short strings apart: at each length 0 to 16, every
    /// string over a two-letter alphabet when there are at most 4,096, else 4,096 random
    /// ones, give as many distinct (length, words) as distinct strings.
    #[test]
    fn ends_and_length_determine_a_short_part() {
        let mut next = crate::inventory::tests::xorshift(0x9e37_79b9_7f4a_7c15_u64);
        for len in 0..=SHORT_PART {
            let mut strings = HashSet::new();
            let mut words = HashSet::new();
            for n in 0..4096u64 {
                let bits = if len <= 12 { n } else { next() };
                let s: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'b' } else { b'a' })
                    .collect();
                words.insert(ends(&s));
                strings.insert(s);
            }
            assert_eq!(strings.len(), words.len(), "length {len}");
        }
    }

    /// `same_bytes` agrees with slice equality at every length 0 to 20, for equal slices and
    /// for slices that differ in one byte at each position or in length.
    #[test]
    fn same_bytes_is_slice_equality() {
        let text = b"abcdefghijklmnopqrstu";
        for len in 0..=20 {
            let a = &text[..len];
            // Another buffer with the same bytes.
            let copy = a.to_vec();
            assert!(same_bytes(a, &copy), "{len}");
            for at in 0..len {
                let mut b = a.to_vec();
                b[at] = b'Z';
                assert!(!same_bytes(a, &b), "{len} at {at}");
            }
            assert!(!same_bytes(a, &text[..len + 1]));
        }
    }

    /// Keys differ where the parts do, including where only the boundary between two parts
    /// moves, and a part over 16 bytes is left to the long path.
    #[test]
    fn keys_tell_parts_apart() {
        let k = ShortKeys::random();
        let key = |u: &str, r: &str, s: &str| k.key(u, r, s);
        let base = key("user-1", "req-1", "sku-1");
        assert!(base.is_some());
        assert_eq!(base, key("user-1", "req-1", "sku-1"));
        for other in [
            key("user-2", "req-1", "sku-1"),
            key("user-1", "req-2", "sku-1"),
            key("user-1", "req-1", "sku-2"),
            key("req-1", "user-1", "sku-1"),
            key("user-1r", "eq-1", "sku-1"),
            key("user-1", "req-1sku", "-1"),
            key("", "user-1req-1", "sku-1"),
        ] {
            let other = other.unwrap_or(IdemKey { key: 0, check: 0 });
            let base = base.unwrap_or(IdemKey { key: 0, check: 0 });
            assert_ne!(base.key, other.key);
            assert_ne!(base.check, other.check);
        }
        assert!(key(&"u".repeat(16), "r", "s").is_some());
        assert!(key(&"u".repeat(17), "r", "s").is_none());
        assert!(key("u", &"r".repeat(17), "s").is_none());
        assert!(key("u", "r", &"s".repeat(17)).is_none());
    }

    /// No two of 300,000 distinct short triples share a key or a check (a collision of
    /// either among this many would be a 2^-27 event for a good 64-bit hash).
    #[test]
    fn no_collisions_among_many_short_keys() {
        let k = ShortKeys::random();
        let (mut keys, mut checks) = (HashSet::new(), HashSet::new());
        let mut n = 0;
        for u in 0..100 {
            for r in 0..100 {
                for s in 0..30 {
                    let key = k.key(&format!("user-{u}"), &format!("{r}"), &format!("sku-{s}"));
                    let key = key.unwrap_or(IdemKey { key: 0, check: 0 });
                    keys.insert(key.key);
                    checks.insert(key.check);
                    n += 1;
                }
            }
        }
        assert_eq!(keys.len(), n);
        assert_eq!(checks.len(), n);
    }
}
