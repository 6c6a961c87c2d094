//! Socket addresses and control messages as bytes, parsed and built without `unsafe`: the
//! kernel lays them out in buffers we own, and reading them field by field with
//! `from_ne_bytes` avoids any question of alignment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// `sizeof(struct cmsghdr)` on 64-bit Linux: `size_t len; int level; int type;`.
const HDR: usize = 16;
const ALIGN: usize = std::mem::size_of::<usize>();

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

fn u16_at(b: &[u8], at: usize) -> Option<[u8; 2]> {
    b.get(at..at + 2)?.try_into().ok()
}

fn u32_at(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at + 4)?.try_into().ok()
}

/// A `sockaddr_in` or `sockaddr_in6` as the kernel wrote it.
pub(crate) fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(u16_at(b, 0)?));
    let port = u16::from_be_bytes(u16_at(b, 2)?);
    match family {
        libc::AF_INET => {
            let ip = Ipv4Addr::from(u32::from_be_bytes(u32_at(b, 4)?));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(u32_at(b, 4)?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(u32_at(b, 24)?);
            let ip = Ipv6Addr::from(ip);
            // A dual-stack socket reports IPv4 peers as mapped addresses; the engine sees
            // them as the IPv4 addresses they are.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope)),
            })
        }
        _ => None,
    }
}

/// What the control messages of one received datagram said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RecvInfo {
    /// GRO: the size of each coalesced datagram.
    pub(crate) segment_size: Option<usize>,
    /// The IP ECN bits.
    pub(crate) ecn: u8,
    /// The local address the datagram was sent to.
    pub(crate) dst_ip: Option<IpAddr>,
    /// When the kernel took the datagram in (`SO_TIMESTAMPNS`): wall-clock time since the Unix
    /// epoch.
    pub(crate) arrived: Option<std::time::Duration>,
}

/// Walks the control messages of a received datagram.
pub(crate) fn parse_recv(control: &[u8]) -> RecvInfo {
    let mut info = RecvInfo::default();
    let mut at = 0;
    while at + HDR <= control.len() {
        let Some(len) = control
            .get(at..at + ALIGN)
            .and_then(|b| b.try_into().ok())
            .map(usize::from_ne_bytes)
        else {
            break;
        };
        let (Some(level), Some(kind)) = (u32_at(control, at + 8), u32_at(control, at + 12)) else {
            break;
        };
        let (level, kind) = (i32::from_ne_bytes(level), i32::from_ne_bytes(kind));
        if len < HDR || at + len > control.len() {
            break;
        }
        let data = &control[at + HDR..at + len];
        match (level, kind) {
            (libc::SOL_UDP, libc::UDP_GRO) => {
                if let Some(v) = u32_at(data, 0) {
                    let size = i32::from_ne_bytes(v);
                    if size > 0 {
                        info.segment_size = Some(size as usize);
                    }
                }
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                // struct timespec { time_t tv_sec; long tv_nsec; } (64-bit)
                let secs = data
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(i64::from_ne_bytes);
                let nanos = data
                    .get(8..16)
                    .and_then(|b| b.try_into().ok())
                    .map(i64::from_ne_bytes);
                if let (Some(secs), Some(nanos)) = (secs, nanos)
                    && let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos))
                    && nanos < 1_000_000_000
                {
                    info.arrived = Some(std::time::Duration::new(secs, nanos));
                }
            }
            (libc::IPPROTO_IP, libc::IP_TOS) => {
                if let Some(&tos) = data.first() {
                    info.ecn = tos & 0b11;
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                if let Some(v) = u32_at(data, 0) {
                    info.ecn = (i32::from_ne_bytes(v) & 0b11) as u8;
                }
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                // struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                if let Some(v) = u32_at(data, 8) {
                    info.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be_bytes(v))));
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                // struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
                if let Some(ip) = data.get(..16).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
                    let ip = Ipv6Addr::from(ip);
                    info.dst_ip = Some(match ip.to_ipv4_mapped() {
                        Some(v4) => IpAddr::V4(v4),
                        None => IpAddr::V6(ip),
                    });
                }
            }
            _ => {}
        }
        at += align(len);
    }
    info
}

/// Builds the control messages of a send into `out` (cleared first): GSO segment size, ECN and
/// source address, each only when set. `v6` says the socket is IPv6 (dual-stack).
pub(crate) fn build_send(
    out: &mut Vec<u8>,
    v6: bool,
    segment_size: Option<usize>,
    ecn: u8,
    src_ip: Option<IpAddr>,
) {
    out.clear();
    if let Some(size) = segment_size {
        push(
            out,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            &(size as u16).to_ne_bytes(),
        );
    }
    if ecn != 0 {
        let value = i32::from(ecn).to_ne_bytes();
        if v6 {
            push(out, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &value);
        } else {
            push(out, libc::IPPROTO_IP, libc::IP_TOS, &value);
        }
    }
    match (src_ip, v6) {
        (Some(IpAddr::V4(ip)), false) => {
            let mut info = [0u8; 12];
            info[4..8].copy_from_slice(&ip.octets());
            push(out, libc::IPPROTO_IP, libc::IP_PKTINFO, &info);
        }
        (Some(ip), true) => {
            let ip = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let mut info = [0u8; 20];
            info[..16].copy_from_slice(&ip.octets());
            push(out, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info);
        }
        _ => {}
    }
}

fn push(out: &mut Vec<u8>, level: i32, kind: i32, data: &[u8]) {
    let len = HDR + data.len();
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&level.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + (align(len) - len), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_messages_parse_back() {
        let mut out = Vec::new();
        build_send(
            &mut out,
            false,
            Some(1200),
            2,
            Some("10.0.0.7".parse().unwrap()),
        );
        // The sender-side layout is the receiver-side one, apart from what each carries:
        // reuse the parser on a UDP_GRO + IP_TOS + IP_PKTINFO sequence.
        let mut recv = Vec::new();
        push(
            &mut recv,
            libc::SOL_UDP,
            libc::UDP_GRO,
            &1200i32.to_ne_bytes(),
        );
        push(&mut recv, libc::IPPROTO_IP, libc::IP_TOS, &[0b10]);
        let mut pkt = [0u8; 12];
        pkt[8..12].copy_from_slice(&[10, 0, 0, 7]);
        push(&mut recv, libc::IPPROTO_IP, libc::IP_PKTINFO, &pkt);
        let info = parse_recv(&recv);
        assert_eq!(info.segment_size, Some(1200));
        assert_eq!(info.ecn, 2);
        assert_eq!(info.dst_ip, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(out.len() % 8, 0);
        assert_eq!(out.len(), 24 + 24 + 32);
    }

    #[test]
    fn a_receive_timestamp_parses_first_and_a_bad_one_is_left_out() {
        let mut recv = Vec::new();
        let mut ts = [0u8; 16];
        ts[..8].copy_from_slice(&1_765_000_000i64.to_ne_bytes());
        ts[8..].copy_from_slice(&250_000_000i64.to_ne_bytes());
        push(&mut recv, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &ts);
        push(
            &mut recv,
            libc::SOL_UDP,
            libc::UDP_GRO,
            &1452i32.to_ne_bytes(),
        );
        let info = parse_recv(&recv);
        assert_eq!(
            info.arrived,
            Some(std::time::Duration::new(1_765_000_000, 250_000_000))
        );
        assert_eq!(info.segment_size, Some(1452));
        // Nanoseconds out of range, or a negative time: no arrival, the rest still read.
        for (secs, nanos) in [(5i64, 1_000_000_000i64), (-1, 0)] {
            let mut bad = Vec::new();
            let mut ts = [0u8; 16];
            ts[..8].copy_from_slice(&secs.to_ne_bytes());
            ts[8..].copy_from_slice(&nanos.to_ne_bytes());
            push(&mut bad, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, &ts);
            push(&mut bad, libc::IPPROTO_IP, libc::IP_TOS, &[0b01]);
            let info = parse_recv(&bad);
            assert_eq!(info.arrived, None);
            assert_eq!(info.ecn, 1);
        }
    }

    #[test]
    fn truncated_or_garbage_control_data_is_ignored() {
        assert_eq!(parse_recv(&[]), RecvInfo::default());
        assert_eq!(parse_recv(&[0xff; 40]), RecvInfo::default());
        let mut recv = Vec::new();
        push(
            &mut recv,
            libc::SOL_UDP,
            libc::UDP_GRO,
            &1200i32.to_ne_bytes(),
        );
        assert_eq!(parse_recv(&recv[..recv.len() - 8]), RecvInfo::default());
    }

    #[test]
    fn addresses_parse_and_mapped_v4_unmaps() {
        let mut v4 = [0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&4433u16.to_be_bytes());
        v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&v4), Some("127.0.0.1:4433".parse().unwrap()));
        let mut v6 = [0u8; 28];
        v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        v6[2..4].copy_from_slice(&9u16.to_be_bytes());
        v6[8..24].copy_from_slice(&Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets());
        assert_eq!(parse_sockaddr(&v6), Some("192.0.2.1:9".parse().unwrap()));
        assert_eq!(parse_sockaddr(&v6[..10]), None);
    }
}
