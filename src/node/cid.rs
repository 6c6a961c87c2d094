//! Connection IDs that name the worker owning the connection.
//!
//! A supernode runs one engine per core, all on one UDP port (a `SO_REUSEPORT` group). The kernel
//! must deliver every packet of a connection to the worker whose engine holds it, also after the
//! client's address changes, so the decision cannot rest on the address. It rests on the first
//! byte of the destination connection id instead: a steering program attached to the socket
//! group picks socket `dcid[0] % workers`, and every connection id a worker issues has a first
//! byte that is its own index modulo the worker count (the other bits of that byte and the seven
//! bytes after it are random).
//!
//! A client's first Initial packets carry a destination id the client made up. They are steered
//! by the same rule, so they all reach one worker; that worker accepts the connection and from
//! then on the client addresses it by ids the worker issued, which lead back to it.

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of every connection id gridcast issues.
pub const CID_LEN: usize = 8;

/// Which of a node's workers an engine is, for connection-id steering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerTag {
    /// This worker's index, below `count`.
    pub index: u8,
    /// How many workers share the port (1 to 128).
    pub count: u8,
}

impl WorkerTag {
    /// The worker a packet with destination connection id first byte `byte` belongs to.
    pub fn owner_of(count: u8, byte: u8) -> u8 {
        byte % count.max(1)
    }
}

/// Issues random connection ids whose first byte steers to one worker.
#[derive(Debug)]
pub(crate) struct WorkerCids {
    tag: WorkerTag,
    rng: SystemRandom,
}

impl WorkerCids {
    pub(crate) fn new(tag: WorkerTag) -> Self {
        Self {
            tag,
            rng: SystemRandom::new(),
        }
    }
}

impl ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        // The OS generator does not fail on Linux once booted; if it did, a zeroed id is still
        // unique enough for quinn, which rejects collisions and asks again.
        let _ = self.rng.fill(&mut bytes);
        let count = u16::from(self.tag.count.max(1));
        let index = u16::from(self.tag.index) % count;
        // The largest multiple m with m * count + index <= 255, then a random one of them.
        let multiples = (255 - index) / count + 1;
        let pick = u16::from(bytes[0]) % multiples;
        bytes[0] = (pick * count + index) as u8;
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        match cid.first() {
            Some(&b)
                if cid.len() == CID_LEN
                    && WorkerTag::owner_of(self.tag.count, b) == self.tag.index =>
            {
                Ok(())
            }
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_issued_id_steers_to_its_worker() {
        for count in [1u8, 2, 3, 7, 16, 128] {
            for index in 0..count {
                let mut cids = WorkerCids::new(WorkerTag { index, count });
                let mut firsts = std::collections::HashSet::new();
                for _ in 0..200 {
                    let cid = cids.generate_cid();
                    assert_eq!(cid.len(), CID_LEN);
                    assert_eq!(WorkerTag::owner_of(count, cid[0]), index);
                    assert!(cids.validate(&cid).is_ok());
                    firsts.insert(cid[0]);
                }
                // The first byte still varies when the worker count leaves room for it.
                if count <= 16 {
                    assert!(firsts.len() > 1, "count {count} index {index}");
                }
            }
        }
    }

    #[test]
    fn another_workers_id_is_invalid_here() {
        let a = WorkerCids::new(WorkerTag { index: 0, count: 4 });
        let mut b = WorkerCids::new(WorkerTag { index: 3, count: 4 });
        let cid = b.generate_cid();
        assert!(a.validate(&cid).is_err());
    }
}
