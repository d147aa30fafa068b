//! Crafted Ethernet/IPv4/TCP frames for BPF_PROG_RUN tests and benches,
//! and a parser for what the XDP balancer sends out.

use std::net::Ipv4Addr;

pub const ETH_LEN: usize = 14;
pub const IP_LEN: usize = 20;
pub const TCP_LEN: usize = 20;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment to craft.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload: Vec<u8>,
}

impl Segment {
    pub fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            flags: TCP_SYN,
            payload: vec![],
        }
    }

    pub fn ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            flags: TCP_ACK | TCP_PSH,
            payload: b"hello".to_vec(),
        }
    }

    /// The full Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        let mut f = eth_header(0x0800);
        let tcp = tcp_segment(self);
        f.extend_from_slice(&ipv4_header(self.src, self.dst, 6, tcp.len(), 0x4000));
        f.extend_from_slice(&tcp);
        f
    }
}

/// Ethernet header from 02:00:00:00:00:02 to 02:00:00:00:00:01.
pub fn eth_header(ethertype: u16) -> Vec<u8> {
    let mut h = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    h.extend_from_slice(&ethertype.to_be_bytes());
    h
}

/// A 20-byte IPv4 header with a valid checksum.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload_len: usize,
    frag: u16,
) -> [u8; IP_LEN] {
    let mut h = [0u8; IP_LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((IP_LEN + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn tcp_segment(s: &Segment) -> Vec<u8> {
    let mut t = vec![0u8; TCP_LEN];
    t[0..2].copy_from_slice(&s.sport.to_be_bytes());
    t[2..4].copy_from_slice(&s.dport.to_be_bytes());
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if s.flags & TCP_ACK != 0 {
        t[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    t[12] = 5 << 4;
    t[13] = s.flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&s.payload);
    let mut pseudo = Vec::with_capacity(12 + t.len());
    pseudo.extend_from_slice(&s.src.octets());
    pseudo.extend_from_slice(&s.dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&t);
    let c = checksum(&pseudo);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// The Internet checksum (RFC 1071). Over a header that includes its own
/// correct checksum it yields 0.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An encapsulated frame as the balancer emits it.
#[derive(Debug)]
pub struct Encapsulated<'a> {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    pub outer_ttl: u8,
    pub outer_tot_len: u16,
    pub outer_checksum_ok: bool,
    /// The inner IPv4 packet, as it was received.
    pub inner: &'a [u8],
}

/// Parses eth | outer IPv4 (proto 4) | inner; `None` if it is not that.
pub fn parse_encapsulated(frame: &[u8]) -> Option<Encapsulated<'_>> {
    if frame.len() < ETH_LEN + 2 * IP_LEN || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
    if ip[0] != 0x45 || ip[9] != 4 {
        return None;
    }
    Some(Encapsulated {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        outer_src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        outer_dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        outer_ttl: ip[8],
        outer_tot_len: u16::from_be_bytes([ip[2], ip[3]]),
        outer_checksum_ok: checksum(ip) == 0,
        inner: &frame[ETH_LEN + IP_LEN..],
    })
}

/// An IPIP frame as a balancer at `outer_src` sends it to `outer_dst`:
/// eth | outer IPv4 (proto 4, DF) | `inner` (an IPv4 packet).
pub fn ipip_frame(outer_src: Ipv4Addr, outer_dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut f = eth_header(0x0800);
    f.extend_from_slice(&ipv4_header(outer_src, outer_dst, 4, inner.len(), 0x4000));
    f.extend_from_slice(inner);
    f
}

/// An ICMP "fragmentation needed" frame (eth | IPv4 | ICMP 3/4 | quote).
#[derive(Debug)]
pub struct FragNeeded<'a> {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The first byte of the IPv4 header (0x45: version 4, no options).
    pub version_ihl: u8,
    pub tot_len: u16,
    pub ttl: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_checksum_ok: bool,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_checksum_ok: bool,
    /// The two bytes before the MTU, zero by RFC 1191.
    pub unused: u16,
    pub next_hop_mtu: u16,
    /// Everything after the ICMP header.
    pub quoted: &'a [u8],
}

/// Parses an IPv4/ICMP frame; `None` if it is not IPv4 carrying ICMP.
pub fn parse_frag_needed(frame: &[u8]) -> Option<FragNeeded<'_>> {
    if frame.len() < ETH_LEN + IP_LEN + 8 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_LEN..ETH_LEN + IP_LEN];
    if ip[9] != 1 {
        return None;
    }
    let icmp = &frame[ETH_LEN + IP_LEN..];
    Some(FragNeeded {
        dst_mac: frame[0..6].try_into().ok()?,
        src_mac: frame[6..12].try_into().ok()?,
        version_ihl: ip[0],
        tot_len: u16::from_be_bytes([ip[2], ip[3]]),
        ttl: ip[8],
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        ip_checksum_ok: checksum(ip) == 0,
        icmp_type: icmp[0],
        icmp_code: icmp[1],
        icmp_checksum_ok: checksum(icmp) == 0,
        unused: u16::from_be_bytes([icmp[4], icmp[5]]),
        next_hop_mtu: u16::from_be_bytes([icmp[6], icmp[7]]),
        quoted: &icmp[8..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_headers_have_valid_checksums() {
        let f = Segment::ack(
            Ipv4Addr::new(198, 18, 1, 2),
            40000,
            Ipv4Addr::new(198, 19, 0, 10),
            8080,
        )
        .frame();
        assert_eq!(checksum(&f[ETH_LEN..ETH_LEN + IP_LEN]), 0);
        let tcp = &f[ETH_LEN + IP_LEN..];
        let mut pseudo = vec![198, 18, 1, 2, 198, 19, 0, 10, 0, 6];
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(tcp);
        assert_eq!(checksum(&pseudo), 0);
    }
}
