//! Header verification with a per-node cache, so a signature is checked once per chunk.
//!
//! Every shard of a chunk arrives with (or after) the same signed header, often from several
//! neighbours. [`HeaderVerifier::verify`] checks the Ed25519 signature the first time it sees a
//! sequence number and remembers the whole verified header. A later header for that sequence
//! skips the signature check only if it is byte-for-byte the remembered one; any difference
//! (a forged header reusing a good sequence number, a flipped bit) is verified in full, so a
//! forgery never rides on an earlier good header.
//!
//! The cache holds the most recent `capacity` sequence numbers; older entries are evicted first.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::header::SignedChunkHeader;
use crate::keys::ChannelId;

/// Why a header or shard was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature does not verify against the channel key.
    #[error("chunk {seq}: header signature does not verify against the channel key")]
    BadSignature {
        /// The chunk's claimed sequence number.
        seq: u64,
    },
}

/// Counters kept by a [`HeaderVerifier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Ed25519 signature checks performed.
    pub signatures_checked: u64,
    /// Headers accepted from the cache without a signature check.
    pub cache_hits: u64,
    /// Headers rejected for a bad signature.
    pub bad_signatures: u64,
    /// Validly signed headers that differ from an earlier validly signed header for the same
    /// sequence (the source signed two different chunks under one number).
    pub equivocations: u64,
}

/// Verifies signed chunk headers for one channel, caching verified ones by sequence.
#[derive(Debug)]
pub struct HeaderVerifier {
    channel: ChannelId,
    cache: BTreeMap<u64, Arc<SignedChunkHeader>>,
    capacity: usize,
    stats: VerifyStats,
}

impl HeaderVerifier {
    /// A verifier for `channel` remembering up to `capacity` recent chunks (at least 1).
    pub fn new(channel: ChannelId, capacity: usize) -> Self {
        Self {
            channel,
            cache: BTreeMap::new(),
            capacity: capacity.max(1),
            stats: VerifyStats::default(),
        }
    }

    /// The channel this verifier checks against.
    pub fn channel(&self) -> &ChannelId {
        &self.channel
    }

    /// Counters so far.
    pub fn stats(&self) -> VerifyStats {
        self.stats
    }

    /// Returns the verified header for `header.header.seq`, checking the signature unless the
    /// identical header was verified before.
    pub fn verify(
        &mut self,
        header: SignedChunkHeader,
    ) -> Result<Arc<SignedChunkHeader>, VerifyError> {
        let seq = header.header.seq;
        if let Some(known) = self.cache.get(&seq)
            && **known == header
        {
            self.stats.cache_hits += 1;
            return Ok(Arc::clone(known));
        }
        self.stats.signatures_checked += 1;
        if !header.signature_valid(&self.channel) {
            self.stats.bad_signatures += 1;
            return Err(VerifyError::BadSignature { seq });
        }
        let header = Arc::new(header);
        if self.cache.contains_key(&seq) {
            // Genuinely signed, yet different: keep the first; the caller gets what it sent.
            self.stats.equivocations += 1;
            return Ok(header);
        }
        self.cache.insert(seq, Arc::clone(&header));
        while self.cache.len() > self.capacity {
            self.cache.pop_first();
        }
        Ok(header)
    }

    /// The verified header for `seq`, if it is still cached.
    pub fn cached(&self, seq: u64) -> Option<&Arc<SignedChunkHeader>> {
        self.cache.get(&seq)
    }
}
