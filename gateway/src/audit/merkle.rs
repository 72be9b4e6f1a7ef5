//! RFC 6962 / RFC 9162 Merkle tree hashing, compact ranges and proofs.
//!
//! Pure functions over leaf hashes: no I/O and no allocation beyond the
//! proofs themselves. Leaves are hashed with a 0x00 prefix and interior nodes
//! with a 0x01 prefix, so a leaf can never be passed off as an interior node
//! (second-preimage protection, RFC 6962 §2.1).

use sha2::{Digest, Sha256};

/// A SHA-256 digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// Domain-separation prefix of leaf hashes (RFC 6962 §2.1).
const LEAF_PREFIX: u8 = 0x00;
/// Domain-separation prefix of interior node hashes (RFC 6962 §2.1).
const NODE_PREFIX: u8 = 0x01;
/// Bytes of the tree size at the start of a serialised [`CompactRange`].
const SIZE_BYTES: usize = 8;
/// Largest tree size a serialised [`CompactRange`] may claim. Keeping it at
/// 2^63 - 1 means no sequence of appends a real log can make will overflow the
/// `u64` size, so `append` can stay infallible.
const MAX_COMPACT_RANGE_SIZE: u64 = (1 << 63) - 1;

/// Why a Merkle computation or proof check failed.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum MerkleError {
    /// The leaf index is not inside the tree.
    #[error("leaf index {index} is out of range for a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    /// The proof has the wrong number of hashes for the given sizes/index.
    #[error("proof has {actual} hashes, expected {expected}")]
    BadProofLength { expected: usize, actual: usize },
    /// The proof is well-formed but does not lead to the expected root(s).
    #[error("computed root does not match the expected root")]
    RootMismatch,
    /// The old tree is larger than the new one.
    #[error("invalid tree sizes: old size {old_size} is larger than new size {new_size}")]
    InvalidSizes { old_size: u64, new_size: u64 },
    /// A serialised compact range could not be decoded.
    #[error("corrupt compact range: {0}")]
    CorruptCompactRange(&'static str),
}

/// RFC 6962 leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(data);
    hasher.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// Root of the empty tree: SHA-256 of the empty string (RFC 6962 §2.1).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The right edge of a tree (the roots of its perfect subtrees, largest
/// first), enough to append in O(log n) and compute the root; persisted by the
/// sequencer between runs.
///
/// A tree of size `n` decomposes into one perfect subtree per set bit of `n`,
/// so `subtree_roots.len() == n.count_ones()` always holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CompactRange {
    size: u64,
    /// Roots of the perfect subtrees covering leaves `0..size`, left to right
    /// (so the largest subtree comes first).
    subtree_roots: Vec<Hash>,
}

impl CompactRange {
    /// The compact range of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves in the tree.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash (already hashed with [`leaf_hash`]).
    pub fn append(&mut self, leaf: Hash) {
        // Each trailing one bit of the old size is a perfect subtree of the same
        // height as the carry being added; merge them like binary addition.
        let mut carry = leaf;
        let mut remaining_size = self.size;
        while remaining_size & 1 == 1 {
            let Some(left) = self.subtree_roots.pop() else {
                // Unreachable while the popcount invariant holds (new and
                // from_bytes enforce it); stop merging rather than panic.
                break;
            };
            carry = node_hash(&left, &carry);
            remaining_size >>= 1;
        }
        self.subtree_roots.push(carry);
        // Sizes start at most at MAX_COMPACT_RANGE_SIZE (2^63 - 1), so this
        // cannot overflow within any achievable number of appends.
        self.size += 1;
    }

    /// Merkle tree hash (RFC 6962 MTH) of the whole tree.
    pub fn root(&self) -> Hash {
        // MTH splits at the largest power of two below n, so the root is the
        // subtree roots folded together from the right.
        let mut roots = self.subtree_roots.iter().rev();
        let Some(last) = roots.next() else {
            return empty_root();
        };
        roots.fold(*last, |right, left| node_hash(left, &right))
    }

    /// Compact binary form: the size as u64 big-endian, then the subtree roots
    /// largest first.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SIZE_BYTES + self.subtree_roots.len() * 32);
        bytes.extend_from_slice(&self.size.to_be_bytes());
        for root in &self.subtree_roots {
            bytes.extend_from_slice(root);
        }
        bytes
    }

    /// Decodes [`CompactRange::to_bytes`] output, checking that it holds
    /// exactly one hash per set bit of the size.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MerkleError> {
        let (size_bytes, hash_bytes) =
            bytes
                .split_first_chunk::<SIZE_BYTES>()
                .ok_or(MerkleError::CorruptCompactRange(
                    "shorter than the size field",
                ))?;
        let size = u64::from_be_bytes(*size_bytes);
        if size > MAX_COMPACT_RANGE_SIZE {
            return Err(MerkleError::CorruptCompactRange(
                "size is implausibly large",
            ));
        }
        if hash_bytes.len() % 32 != 0 {
            return Err(MerkleError::CorruptCompactRange(
                "hash data is not a whole number of hashes",
            ));
        }
        if hash_bytes.len() / 32 != size.count_ones() as usize {
            return Err(MerkleError::CorruptCompactRange(
                "hash count does not match the tree size",
            ));
        }
        let subtree_roots = hash_bytes
            .chunks_exact(32)
            .map(|chunk| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(chunk);
                hash
            })
            .collect();
        Ok(Self {
            size,
            subtree_roots,
        })
    }
}

/// Merkle tree hash (RFC 6962 MTH) of the given leaf hashes, in O(n) time and
/// O(log n) memory.
pub fn root_from_leaves(leaf_hashes: &[Hash]) -> Hash {
    let mut range = CompactRange::new();
    for leaf in leaf_hashes {
        range.append(*leaf);
    }
    range.root()
}

/// Largest power of two strictly smaller than `n`; the RFC 6962 split point.
/// Callers guarantee `n >= 2`.
fn split_point(n: usize) -> usize {
    let highest_bit = usize::BITS - 1 - (n - 1).leading_zeros();
    1 << highest_bit
}

/// RFC 6962 §2.1.1 PATH(index, D[0:n]) where `leaf_hashes` is the whole tree.
///
/// Walks from the root down, hashing each sibling subtree once; the siblings
/// shrink geometrically, so the total work is O(n).
pub fn inclusion_proof(leaf_hashes: &[Hash], index: u64) -> Result<Vec<Hash>, MerkleError> {
    let size = leaf_hashes.len();
    let out_of_range = MerkleError::IndexOutOfRange {
        index,
        size: size as u64,
    };
    let index = usize::try_from(index).map_err(|_| out_of_range.clone())?;
    if index >= size {
        return Err(out_of_range);
    }
    // The current subtree is leaf_hashes[start..end] and always contains index.
    let (mut start, mut end) = (0, size);
    let mut siblings_top_down = Vec::new();
    while end - start > 1 {
        let mid = start + split_point(end - start);
        if index < mid {
            siblings_top_down.push(root_from_leaves(&leaf_hashes[mid..end]));
            end = mid;
        } else {
            siblings_top_down.push(root_from_leaves(&leaf_hashes[start..mid]));
            start = mid;
        }
    }
    // RFC order is leaf-to-root.
    siblings_top_down.reverse();
    Ok(siblings_top_down)
}

/// Number of hashes in an inclusion proof of `index` in a tree of `size`:
/// the levels where the paths to `index` and to the last leaf differ, plus
/// the left siblings above that point. Callers guarantee `index < size`.
fn inclusion_proof_len(index: u64, size: u64) -> usize {
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = index.checked_shr(inner).unwrap_or(0).count_ones();
    (inner + border) as usize
}

/// Checks an inclusion proof with the algorithm of RFC 9162 §2.1.3.2.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let expected_len = inclusion_proof_len(index, size);
    if proof.len() != expected_len {
        return Err(MerkleError::BadProofLength {
            expected: expected_len,
            actual: proof.len(),
        });
    }
    // fn/sn of the RFC: the node index of our path and of the tree's last
    // node at the current level.
    let mut path_index = index;
    let mut last_index = size - 1;
    let mut computed = *leaf;
    for sibling in proof {
        if last_index == 0 {
            return Err(MerkleError::BadProofLength {
                expected: expected_len,
                actual: proof.len(),
            });
        }
        if path_index & 1 == 1 || path_index == last_index {
            computed = node_hash(sibling, &computed);
            // Skip levels where our node is the lone rightmost child and so
            // is promoted without hashing.
            while path_index & 1 == 0 && path_index != 0 {
                path_index >>= 1;
                last_index >>= 1;
            }
        } else {
            computed = node_hash(&computed, sibling);
        }
        path_index >>= 1;
        last_index >>= 1;
    }
    if last_index != 0 {
        return Err(MerkleError::BadProofLength {
            expected: expected_len,
            actual: proof.len(),
        });
    }
    if computed != *root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

/// RFC 6962 §2.1.2 PROOF(old_size, D[0:n]) where `leaf_hashes` is the whole
/// new tree. Empty when `old_size` is 0 or equal to the new size.
pub fn consistency_proof(leaf_hashes: &[Hash], old_size: u64) -> Result<Vec<Hash>, MerkleError> {
    let new_size = leaf_hashes.len();
    let invalid = MerkleError::InvalidSizes {
        old_size,
        new_size: new_size as u64,
    };
    let old_size = usize::try_from(old_size).map_err(|_| invalid.clone())?;
    if old_size > new_size {
        return Err(invalid);
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    // Iterative SUBPROOF(m, D[start:end], old_root_is_known): the current
    // subtree is leaf_hashes[start..end] and old_in_subtree is m.
    let (mut start, mut end, mut old_in_subtree) = (0, new_size, old_size);
    // True while the old tree's root is a node the verifier already has.
    let mut old_root_is_known = true;
    let mut hashes_top_down = Vec::new();
    while old_in_subtree != end - start {
        let mid = start + split_point(end - start);
        if old_in_subtree <= mid - start {
            hashes_top_down.push(root_from_leaves(&leaf_hashes[mid..end]));
            end = mid;
        } else {
            hashes_top_down.push(root_from_leaves(&leaf_hashes[start..mid]));
            old_in_subtree -= mid - start;
            start = mid;
            old_root_is_known = false;
        }
    }
    if !old_root_is_known {
        hashes_top_down.push(root_from_leaves(&leaf_hashes[start..end]));
    }
    hashes_top_down.reverse();
    Ok(hashes_top_down)
}

/// Number of hashes in a consistency proof between sizes `0 < old < new`.
///
/// The proof is an inclusion proof, at the height of the old tree's last
/// perfect subtree, of that subtree's root; plus that root itself unless the
/// old tree is a single perfect subtree (the verifier already has it).
fn consistency_proof_len(old_size: u64, new_size: u64) -> usize {
    let level = old_size.trailing_zeros();
    let node_index = (old_size - 1) >> level;
    let last_index = (new_size - 1) >> level;
    let inner = 64 - (node_index ^ last_index).leading_zeros();
    let border = node_index.checked_shr(inner).unwrap_or(0).count_ones();
    let seed = u32::from(node_index != 0);
    (inner + border + seed) as usize
}

/// Checks a consistency proof with the algorithm of RFC 9162 §2.1.4.2.
///
/// Equal sizes need an empty proof and equal roots; an old size of 0 needs an
/// empty proof and `old_root` equal to [`empty_root`].
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size > new_size {
        return Err(MerkleError::InvalidSizes { old_size, new_size });
    }
    if old_size == new_size || old_size == 0 {
        if !proof.is_empty() {
            return Err(MerkleError::BadProofLength {
                expected: 0,
                actual: proof.len(),
            });
        }
        if old_size == 0 && *old_root != empty_root() {
            return Err(MerkleError::RootMismatch);
        }
        if old_size == new_size && old_root != new_root {
            return Err(MerkleError::RootMismatch);
        }
        return Ok(());
    }

    let expected_len = consistency_proof_len(old_size, new_size);
    let bad_length = MerkleError::BadProofLength {
        expected: expected_len,
        actual: proof.len(),
    };
    if proof.len() != expected_len {
        return Err(bad_length);
    }
    // When the old tree is one perfect subtree the proof omits its root (the
    // verifier has it), so the RFC prepends old_root to the path.
    let (seed, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        match proof.split_first() {
            Some((first, rest)) => (first, rest),
            None => return Err(bad_length),
        }
    };
    // fn/sn of the RFC, starting at the old tree's last leaf.
    let mut path_index = old_size - 1;
    let mut last_index = new_size - 1;
    while path_index & 1 == 1 {
        path_index >>= 1;
        last_index >>= 1;
    }
    let mut old_computed = *seed;
    let mut new_computed = *seed;
    for hash in rest {
        if last_index == 0 {
            return Err(bad_length);
        }
        if path_index & 1 == 1 || path_index == last_index {
            old_computed = node_hash(hash, &old_computed);
            new_computed = node_hash(hash, &new_computed);
            while path_index & 1 == 0 && path_index != 0 {
                path_index >>= 1;
                last_index >>= 1;
            }
        } else {
            // Right siblings exist only in the new tree.
            new_computed = node_hash(&new_computed, hash);
        }
        path_index >>= 1;
        last_index >>= 1;
    }
    if last_index != 0 {
        return Err(bad_length);
    }
    if old_computed != *old_root || new_computed != *new_root {
        return Err(MerkleError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_hash(hex: &str) -> Hash {
        assert_eq!(hex.len(), 64, "hash hex must be 64 chars: {hex}");
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hashes(hexes: &[&str]) -> Vec<Hash> {
        hexes.iter().map(|h| hex_hash(h)).collect()
    }

    // Leaf inputs: transparency-dev/merkle, testonly/constants.go, LeafInputs().
    const LEAF_INPUTS_HEX: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];

    // Node hashes by level: transparency-dev/merkle, testonly/constants.go,
    // NodeHashes(). Level 0 are the leaf hashes of LEAF_INPUTS_HEX.
    const LEVEL0_HEX: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ];
    const LEVEL1_HEX: [&str; 4] = [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ];
    const LEVEL2_HEX: [&str; 2] = [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ];
    const LEVEL3_HEX: &str = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328";

    // Roots for sizes 0..=8: transparency-dev/merkle, testonly/constants.go,
    // RootHashes() (index 0 is EmptyRootHash()).
    const ROOTS_HEX: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    // (index, size, proof): transparency-dev/merkle, testonly/reference_test.go
    // TestRefInclusionProof, and proof/verify_test.go inclusionProofs (which
    // lists 1-based leaf numbers; converted to 0-based indices here).
    const INCLUSION_VECTORS: &[(u64, u64, &[&str])] = &[
        (0, 1, &[]),
        (
            0,
            2,
            &["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
        ),
        (
            1,
            2,
            &["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    // (old_size, new_size, proof): transparency-dev/merkle, proof/verify_test.go
    // consistencyProofs and testonly/reference_test.go TestRefConsistencyProof.
    const CONSISTENCY_VECTORS: &[(u64, u64, &[&str])] = &[
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    // Arbitrary non-root hash used as a tampered value; it is the
    // sha256SomeHash of transparency-dev/merkle proof/verify_test.go.
    const SOME_HASH_HEX: &str = "abacaba000000000000000000000000000000000000000000060061e00123456";

    fn vector_leaves() -> Vec<Hash> {
        LEAF_INPUTS_HEX
            .iter()
            .map(|hex| leaf_hash(&hex_bytes(hex)))
            .collect()
    }

    fn root_of_size(size: u64) -> Hash {
        hex_hash(ROOTS_HEX[size as usize])
    }

    #[test]
    fn leaf_hashes_match_published_level0() {
        assert_eq!(vector_leaves(), hashes(&LEVEL0_HEX));
    }

    #[test]
    fn node_hashes_match_published_levels() {
        let level0 = hashes(&LEVEL0_HEX);
        let level1 = hashes(&LEVEL1_HEX);
        let level2 = hashes(&LEVEL2_HEX);
        for i in 0..4 {
            assert_eq!(node_hash(&level0[2 * i], &level0[2 * i + 1]), level1[i]);
        }
        for i in 0..2 {
            assert_eq!(node_hash(&level1[2 * i], &level1[2 * i + 1]), level2[i]);
        }
        assert_eq!(node_hash(&level2[0], &level2[1]), hex_hash(LEVEL3_HEX));
    }

    #[test]
    fn empty_root_matches_published_value() {
        assert_eq!(empty_root(), root_of_size(0));
        assert_eq!(root_from_leaves(&[]), root_of_size(0));
        assert_eq!(CompactRange::new().root(), root_of_size(0));
    }

    #[test]
    fn root_from_leaves_matches_published_roots() {
        let leaves = vector_leaves();
        for size in 0..=8 {
            assert_eq!(
                root_from_leaves(&leaves[..size]),
                root_of_size(size as u64),
                "size {size}"
            );
        }
    }

    #[test]
    fn compact_range_root_after_each_append_matches_published_roots() {
        let mut range = CompactRange::new();
        for (i, leaf) in vector_leaves().into_iter().enumerate() {
            range.append(leaf);
            assert_eq!(range.size(), i as u64 + 1);
            assert_eq!(range.root(), root_of_size(i as u64 + 1), "size {}", i + 1);
        }
    }

    #[test]
    fn compact_range_edge_matches_published_compact_trees() {
        // transparency-dev/merkle, testonly/constants.go, CompactTrees():
        // the subtree roots of each tree size, expressed as NodeHashes entries.
        let expected: [&[&str]; 9] = [
            &[],
            &[LEVEL0_HEX[0]],
            &[LEVEL1_HEX[0]],
            &[LEVEL1_HEX[0], LEVEL0_HEX[2]],
            &[LEVEL2_HEX[0]],
            &[LEVEL2_HEX[0], LEVEL0_HEX[4]],
            &[LEVEL2_HEX[0], LEVEL1_HEX[2]],
            &[LEVEL2_HEX[0], LEVEL1_HEX[2], LEVEL0_HEX[6]],
            &[LEVEL3_HEX],
        ];
        let mut range = CompactRange::new();
        assert!(range.subtree_roots.is_empty());
        for (i, leaf) in vector_leaves().into_iter().enumerate() {
            range.append(leaf);
            assert_eq!(
                range.subtree_roots,
                hashes(expected[i + 1]),
                "size {}",
                i + 1
            );
        }
    }

    #[test]
    fn compact_range_bytes_round_trip() {
        let mut range = CompactRange::new();
        let decoded = CompactRange::from_bytes(&range.to_bytes()).unwrap();
        assert_eq!(decoded, range);
        for leaf in vector_leaves() {
            range.append(leaf);
            let bytes = range.to_bytes();
            assert_eq!(bytes.len(), 8 + 32 * range.size().count_ones() as usize);
            assert_eq!(&bytes[..8], &range.size().to_be_bytes());
            let decoded = CompactRange::from_bytes(&bytes).unwrap();
            assert_eq!(decoded, range);
            assert_eq!(decoded.root(), range.root());
        }
        // A decoded range keeps appending correctly.
        let leaves = vector_leaves();
        let mut five = CompactRange::new();
        for leaf in &leaves[..5] {
            five.append(*leaf);
        }
        let mut resumed = CompactRange::from_bytes(&five.to_bytes()).unwrap();
        for leaf in &leaves[5..] {
            resumed.append(*leaf);
        }
        assert_eq!(resumed.root(), root_of_size(8));
    }

    #[test]
    fn compact_range_rejects_corrupt_bytes() {
        let mut range = CompactRange::new();
        for leaf in &vector_leaves()[..7] {
            range.append(*leaf);
        }
        let good = range.to_bytes();
        let corrupt = |bytes: &[u8]| {
            matches!(
                CompactRange::from_bytes(bytes),
                Err(MerkleError::CorruptCompactRange(_))
            )
        };
        assert!(corrupt(&[]));
        assert!(corrupt(&good[..7]));
        assert!(corrupt(&good[..good.len() - 1]));
        assert!(corrupt(&good[..good.len() - 32]));
        let mut extra = good.clone();
        extra.extend_from_slice(&[0u8; 32]);
        assert!(corrupt(&extra));
        let mut wrong_size = good.clone();
        wrong_size[7] = 8; // popcount 1, but three hashes follow
        assert!(corrupt(&wrong_size));
        let mut huge = u64::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0u8; 32 * 64]);
        assert!(corrupt(&huge));
    }

    #[test]
    fn inclusion_proofs_match_published_vectors() {
        let leaves = vector_leaves();
        for &(index, size, proof_hex) in INCLUSION_VECTORS {
            let tree = &leaves[..size as usize];
            let expected = hashes(proof_hex);
            assert_eq!(
                inclusion_proof(tree, index).unwrap(),
                expected,
                "index {index} size {size}"
            );
            verify_inclusion(
                index,
                size,
                &leaves[index as usize],
                &expected,
                &root_of_size(size),
            )
            .unwrap();
        }
    }

    #[test]
    fn inclusion_proof_rejects_index_out_of_range() {
        let leaves = vector_leaves();
        assert_eq!(
            inclusion_proof(&leaves, 8),
            Err(MerkleError::IndexOutOfRange { index: 8, size: 8 })
        );
        assert_eq!(
            inclusion_proof(&[], 0),
            Err(MerkleError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert!(inclusion_proof(&leaves, u64::MAX).is_err());
        let root = root_of_size(8);
        for (index, size) in [(0, 0), (1, 0), (2, 1), (8, 8), (u64::MAX, u64::MAX)] {
            assert_eq!(
                verify_inclusion(index, size, &leaves[0], &[], &root),
                Err(MerkleError::IndexOutOfRange { index, size })
            );
        }
    }

    #[test]
    fn tampered_inclusion_proofs_fail() {
        // The corruption probes mirror corruptInclusionProof in
        // transparency-dev/merkle proof/verify_test.go.
        let leaves = vector_leaves();
        let some_hash = hex_hash(SOME_HASH_HEX);
        for &(index, size, proof_hex) in INCLUSION_VECTORS {
            let proof = hashes(proof_hex);
            let root = root_of_size(size);
            let leaf = leaves[index as usize];
            let fails = |index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash| {
                verify_inclusion(index, size, leaf, proof, root).is_err()
            };
            if index > 0 {
                assert!(fails(index - 1, size, &leaf, &proof, &root));
            }
            assert!(fails(index + 1, size, &leaf, &proof, &root));
            assert!(fails(index ^ 2, size, &leaf, &proof, &root));
            assert!(fails(index, size * 2, &leaf, &proof, &root));
            assert!(fails(index, size / 2, &leaf, &proof, &root));
            assert!(fails(index, size, &some_hash, &proof, &root));
            assert!(fails(index, size, &leaf, &proof, &empty_root()));
            assert!(fails(index, size, &leaf, &proof, &some_hash));
            let mut trailing = proof.clone();
            trailing.push(root);
            assert!(fails(index, size, &leaf, &trailing, &root));
            let mut preceding = vec![root];
            preceding.extend_from_slice(&proof);
            assert!(fails(index, size, &leaf, &preceding, &root));
            for i in 0..proof.len() {
                let mut flipped = proof.clone();
                flipped[i][0] ^= 8;
                assert_eq!(
                    verify_inclusion(index, size, &leaf, &flipped, &root),
                    Err(MerkleError::RootMismatch)
                );
            }
            if !proof.is_empty() {
                assert!(matches!(
                    verify_inclusion(index, size, &leaf, &proof[..proof.len() - 1], &root),
                    Err(MerkleError::BadProofLength { .. })
                ));
            }
        }
    }

    #[test]
    fn consistency_proofs_match_published_vectors() {
        let leaves = vector_leaves();
        for &(old_size, new_size, proof_hex) in CONSISTENCY_VECTORS {
            let expected = hashes(proof_hex);
            assert_eq!(
                consistency_proof(&leaves[..new_size as usize], old_size).unwrap(),
                expected,
                "{old_size} -> {new_size}"
            );
            verify_consistency(
                old_size,
                new_size,
                &root_of_size(old_size),
                &root_of_size(new_size),
                &expected,
            )
            .unwrap();
        }
    }

    #[test]
    fn tampered_consistency_proofs_fail() {
        // The corruption probes mirror corruptConsistencyProof in
        // transparency-dev/merkle proof/verify_test.go.
        for &(old_size, new_size, proof_hex) in CONSISTENCY_VECTORS {
            let proof = hashes(proof_hex);
            if proof.is_empty() {
                continue;
            }
            let old_root = root_of_size(old_size);
            let new_root = root_of_size(new_size);
            let fails = |old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]| {
                verify_consistency(old, new, old_root, new_root, proof).is_err()
            };
            assert!(fails(old_size - 1, new_size, &old_root, &new_root, &proof));
            assert!(fails(old_size + 1, new_size, &old_root, &new_root, &proof));
            assert!(fails(old_size ^ 2, new_size, &old_root, &new_root, &proof));
            assert!(fails(old_size, new_size * 2, &old_root, &new_root, &proof));
            assert!(fails(old_size, new_size / 2, &old_root, &new_root, &proof));
            let some_hash = hex_hash(SOME_HASH_HEX);
            assert!(fails(old_size, new_size, &some_hash, &new_root, &proof));
            assert!(fails(old_size, new_size, &old_root, &some_hash, &proof));
            assert!(fails(old_size, new_size, &new_root, &old_root, &proof));
            assert!(fails(old_size, new_size, &old_root, &new_root, &[]));
            for extra in [old_root, new_root] {
                let mut trailing = proof.clone();
                trailing.push(extra);
                assert!(fails(old_size, new_size, &old_root, &new_root, &trailing));
                let mut preceding = vec![extra];
                preceding.extend_from_slice(&proof);
                assert!(fails(old_size, new_size, &old_root, &new_root, &preceding));
            }
            assert!(fails(
                old_size,
                new_size,
                &old_root,
                &new_root,
                &proof[..proof.len() - 1]
            ));
            for i in 0..proof.len() {
                let mut flipped = proof.clone();
                flipped[i][0] ^= 16;
                assert_eq!(
                    verify_consistency(old_size, new_size, &old_root, &new_root, &flipped),
                    Err(MerkleError::RootMismatch)
                );
            }
        }
    }

    #[test]
    fn consistency_edge_cases() {
        // Cases from TestVerifyConsistency in transparency-dev/merkle
        // proof/verify_test.go, adapted to the stricter size-0 rule here.
        let empty = empty_root();
        let root1 = root_of_size(1);
        let root2 = root_of_size(2);
        verify_consistency(0, 0, &empty, &empty, &[]).unwrap();
        verify_consistency(0, 1, &empty, &root1, &[]).unwrap();
        verify_consistency(1, 1, &root1, &root1, &[]).unwrap();
        assert_eq!(
            verify_consistency(0, 1, &root2, &root1, &[]),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(1, 1, &root1, &root2, &[]),
            Err(MerkleError::RootMismatch)
        );
        assert_eq!(
            verify_consistency(1, 0, &root1, &empty, &[]),
            Err(MerkleError::InvalidSizes {
                old_size: 1,
                new_size: 0
            })
        );
        assert_eq!(
            verify_consistency(1, 1, &root1, &root1, &[empty]),
            Err(MerkleError::BadProofLength {
                expected: 0,
                actual: 1
            })
        );
        assert!(verify_consistency(1, 2, &root1, &root2, &[]).is_err());
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &root1, &root2, &[]).is_err());
        assert_eq!(
            consistency_proof(&vector_leaves()[..3], 4),
            Err(MerkleError::InvalidSizes {
                old_size: 4,
                new_size: 3
            })
        );
        assert_eq!(consistency_proof(&vector_leaves(), 0), Ok(Vec::new()));
        assert_eq!(consistency_proof(&vector_leaves(), 8), Ok(Vec::new()));
    }

    #[test]
    fn extreme_sizes_are_rejected_without_panicking() {
        let leaf = leaf_hash(b"x");
        let root = empty_root();
        let top_bit = 1u64 << 63;
        // index ^ (size - 1) has bit 63 set here, so the proof length formula
        // must not shift by 64.
        for (index, size) in [(0, top_bit + 1), (top_bit, top_bit + 1), (0, u64::MAX)] {
            assert!(matches!(
                verify_inclusion(index, size, &leaf, &[], &root),
                Err(MerkleError::BadProofLength { .. })
            ));
        }
        for (old_size, new_size) in [(1, u64::MAX), (top_bit, u64::MAX), (u64::MAX - 1, u64::MAX)] {
            assert!(matches!(
                verify_consistency(old_size, new_size, &root, &root, &[]),
                Err(MerkleError::BadProofLength { .. })
            ));
        }
    }

    #[test]
    fn all_small_trees_produce_proofs_that_verify() {
        // Self-consistency over every index and size pair up to 70 leaves,
        // which exercises odd shapes the published vectors do not.
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let roots: Vec<Hash> = (0..=leaves.len())
            .map(|n| root_from_leaves(&leaves[..n]))
            .collect();
        for new_size in 1..=leaves.len() {
            let tree = &leaves[..new_size];
            let n = new_size as u64;
            for index in 0..n {
                let proof = inclusion_proof(tree, index).unwrap();
                verify_inclusion(index, n, &leaves[index as usize], &proof, &roots[new_size])
                    .unwrap();
            }
            for old_size in 0..=n {
                let proof = consistency_proof(tree, old_size).unwrap();
                verify_consistency(
                    old_size,
                    n,
                    &roots[old_size as usize],
                    &roots[new_size],
                    &proof,
                )
                .unwrap();
            }
        }
    }
}
