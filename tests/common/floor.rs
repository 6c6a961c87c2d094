//! The raw floor's work per datagram, shared by the benches that measure against it: copy a
//! piece of payload into the send buffer and seal it in place with AES-128-GCM (the suite
//! gridcast nodes agree on), tag after it, under a fresh nonce.

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// AES-GCM's tag.
pub const TAG: usize = 16;
/// Payload per datagram: gridcast's datagram on loopback (1452 bytes, the bound of its path
/// MTU discovery) less the tag.
pub const DATAGRAM: usize = 1452 - TAG;

/// Seals datagrams under one key, counting them.
pub struct Sealer {
    key: LessSafeKey,
    sealed: u64,
}

impl Sealer {
    pub fn new() -> Self {
        Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap()),
            sealed: 0,
        }
    }

    /// Appends `piece` to `out` and seals it there, its tag after it.
    #[inline(always)]
    pub fn seal_onto(&mut self, out: &mut Vec<u8>, piece: &[u8]) {
        let at = out.len();
        out.extend_from_slice(piece);
        self.sealed += 1;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&self.sealed.to_be_bytes());
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[at..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
    }

    /// Datagrams sealed so far.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }
}
