//! A DHCPv4 client (RFC 2131) for one interface: DISCOVER, OFFER, REQUEST, ACK, then renewal
//! at half the lease in a background thread, so a DHCP server on the host's bridge never hands
//! the address of a long-running agent to another VM.
//!
//! Packets are built and read by pure functions ([`Packet`], [`Reply::parse`]); the socket is a
//! UDP socket bound to the interface (`SO_BINDTODEVICE`), which can broadcast before the
//! interface has an address. The client asks servers to broadcast their replies (the BROADCAST
//! flag), as an interface without an address cannot receive unicast.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::net::Address;

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const BROADCAST_FLAG: u16 = 0x8000;
/// The fixed part of a BOOTP message, before the magic cookie.
const FIXED_LEN: usize = 236;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMETERS: u8 = 55;
const OPT_END: u8 = 255;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client looks for servers.
    Discover = 1,
    /// A server offers an address.
    Offer = 2,
    /// A client asks for the offered (or its current) address.
    Request = 3,
    /// A server confirms the lease.
    Ack = 5,
    /// A server refuses the request.
    Nak = 6,
}

/// A request this client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// DISCOVER or REQUEST.
    pub kind: Kind,
    /// The transaction id replies must carry.
    pub xid: u32,
    /// The interface's hardware address.
    pub mac: [u8; 6],
    /// The address asked for (REQUEST after an OFFER).
    pub requested: Option<Ipv4Addr>,
    /// The server chosen (REQUEST after an OFFER).
    pub server: Option<Ipv4Addr>,
    /// The address held (a renewal, sent from it).
    pub client: Option<Ipv4Addr>,
}

impl Packet {
    /// The message as sent on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = vec![0u8; FIXED_LEN];
        p[0] = BOOTREQUEST;
        p[1] = 1; // Ethernet
        p[2] = 6; // hardware address length
        p[4..8].copy_from_slice(&self.xid.to_be_bytes());
        if self.client.is_none() {
            p[10..12].copy_from_slice(&BROADCAST_FLAG.to_be_bytes());
        }
        if let Some(client) = self.client {
            p[12..16].copy_from_slice(&client.octets());
        }
        p[28..34].copy_from_slice(&self.mac);
        p.extend_from_slice(&MAGIC_COOKIE);
        p.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, self.kind as u8]);
        for (option, address) in [
            (OPT_REQUESTED_IP, self.requested),
            (OPT_SERVER_ID, self.server),
        ] {
            if let Some(address) = address {
                p.extend_from_slice(&[option, 4]);
                p.extend_from_slice(&address.octets());
            }
        }
        p.extend_from_slice(&[
            OPT_PARAMETERS,
            4,
            OPT_SUBNET_MASK,
            OPT_ROUTER,
            OPT_DNS,
            OPT_LEASE_TIME,
        ]);
        p.push(OPT_END);
        // Some servers drop BOOTP messages shorter than the 300 bytes BOOTP clients send.
        p.resize(p.len().max(300), OPT_PAD);
        p
    }
}

/// A server's answer, as far as this client uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// OFFER, ACK or NAK.
    pub kind: Kind,
    /// The address offered or leased (`yiaddr`).
    pub address: Ipv4Addr,
    /// The server's identifier (option 54).
    pub server: Option<Ipv4Addr>,
    /// The prefix length from the subnet mask (option 1).
    pub prefix: Option<u8>,
    /// The first router (option 3).
    pub router: Option<Ipv4Addr>,
    /// Name servers (option 6).
    pub nameservers: Vec<Ipv4Addr>,
    /// The lease (option 51); `None` for an infinite or absent lease.
    pub lease: Option<Duration>,
}

impl Reply {
    /// Reads a server's reply meant for this transaction and hardware address; anything else
    /// (another client's reply, a request, a malformed packet) is `None`.
    pub fn parse(packet: &[u8], xid: u32, mac: [u8; 6]) -> Option<Self> {
        let fixed = packet.get(..FIXED_LEN)?;
        if fixed[0] != BOOTREPLY
            || fixed[4..8] != xid.to_be_bytes()
            || fixed[28..34] != mac
            || packet.get(FIXED_LEN..FIXED_LEN + 4)? != MAGIC_COOKIE
        {
            return None;
        }
        let address = Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]);
        let mut reply = Self {
            kind: Kind::Nak,
            address,
            server: None,
            prefix: None,
            router: None,
            nameservers: Vec::new(),
            lease: None,
        };
        let mut kind = None;
        let mut options = &packet[FIXED_LEN + 4..];
        while let Some((&option, rest)) = options.split_first() {
            match option {
                OPT_END => break,
                OPT_PAD => {
                    options = rest;
                    continue;
                }
                _ => {}
            }
            let (&len, rest) = rest.split_first()?;
            let value = rest.get(..usize::from(len))?;
            options = &rest[usize::from(len)..];
            let first_address = || -> Option<Ipv4Addr> {
                let a: [u8; 4] = value.get(..4)?.try_into().ok()?;
                Some(a.into())
            };
            match option {
                OPT_MESSAGE_TYPE => {
                    kind = match value.first()? {
                        2 => Some(Kind::Offer),
                        5 => Some(Kind::Ack),
                        6 => Some(Kind::Nak),
                        _ => return None,
                    }
                }
                OPT_SERVER_ID => reply.server = first_address(),
                OPT_ROUTER => reply.router = first_address(),
                OPT_SUBNET_MASK => {
                    let mask = u32::from(first_address()?);
                    // A mask is ones then zeros; anything else is not a prefix.
                    if mask.leading_ones() + mask.trailing_zeros() != 32 {
                        return None;
                    }
                    reply.prefix = u8::try_from(mask.leading_ones()).ok();
                }
                OPT_DNS => {
                    reply.nameservers = value
                        .chunks_exact(4)
                        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                        .collect();
                }
                OPT_LEASE_TIME => {
                    let secs = u32::from_be_bytes(value.get(..4)?.try_into().ok()?);
                    reply.lease = (secs != u32::MAX).then(|| Duration::from_secs(secs.into()));
                }
                _ => {}
            }
        }
        reply.kind = kind?;
        Some(reply)
    }

    /// The address to configure: the prefix from the mask, else the address's class default
    /// (RFC 2132 makes the mask optional), and the router as the gateway.
    pub fn address(&self) -> Address {
        let prefix = self.prefix.unwrap_or(match self.address.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        });
        Address {
            ip: self.address,
            prefix,
            gateway: self.router,
        }
    }
}

/// A lease obtained on an interface.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The ACK that granted it.
    pub reply: Reply,
    /// The server that granted it.
    pub server: Ipv4Addr,
    xid: u32,
    mac: [u8; 6],
    interface: String,
}

/// A UDP socket on port 68 of `interface`, able to broadcast before the interface has an
/// address.
fn open(interface: &str, timeout: Duration) -> Result<UdpSocket, String> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| format!("DHCP socket: {e}"))?;
    socket
        .set_reuse_address(true)
        .and_then(|()| socket.set_broadcast(true))
        .and_then(|()| socket.bind_device(Some(interface.as_bytes())))
        .and_then(|()| socket.set_read_timeout(Some(timeout)))
        .map_err(|e| format!("DHCP socket on {interface}: {e}"))?;
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT).into())
        .map_err(|e| format!("DHCP socket on {interface}: binding port 68: {e}"))?;
    Ok(socket.into())
}

/// Sends `packet` to `to` and waits up to `wait` for a matching reply of one of `kinds`.
fn exchange(
    socket: &UdpSocket,
    packet: &Packet,
    to: Ipv4Addr,
    kinds: &[Kind],
    wait: Duration,
) -> Result<Option<Reply>, String> {
    socket
        .send_to(&packet.encode(), SocketAddrV4::new(to, SERVER_PORT))
        .map_err(|e| format!("sending DHCP {:?}: {e}", packet.kind))?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                if let Some(reply) = Reply::parse(&buf[..n], packet.xid, packet.mac)
                    && kinds.contains(&reply.kind)
                {
                    return Ok(Some(reply));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("receiving DHCP replies: {e}")),
        }
    }
    Ok(None)
}

/// A transaction id: what the kernel's random pool gives, else the clock and the MAC.
fn transaction_id(mac: [u8; 6]) -> u32 {
    let mut bytes = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok()
    {
        return u32::from_ne_bytes(bytes);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos ^ u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]])
}

/// Obtains a lease on `interface` (which must be up), retrying DISCOVER with a growing wait
/// until `budget` is spent.
///
/// # Errors
/// A sentence: no server answered within the budget, or the socket failed.
pub fn obtain(interface: &str, mac: [u8; 6], budget: Duration) -> Result<Lease, String> {
    let socket = open(interface, Duration::from_millis(100))?;
    let deadline = Instant::now() + budget;
    let mut wait = Duration::from_millis(500);
    while Instant::now() < deadline {
        let xid = transaction_id(mac);
        let discover = Packet {
            kind: Kind::Discover,
            xid,
            mac,
            requested: None,
            server: None,
            client: None,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(offer) = exchange(
            &socket,
            &discover,
            Ipv4Addr::BROADCAST,
            &[Kind::Offer],
            wait.min(left),
        )?
        else {
            wait = (wait * 2).min(Duration::from_secs(4));
            continue;
        };
        let Some(server) = offer.server else {
            continue;
        };
        let request = Packet {
            kind: Kind::Request,
            requested: Some(offer.address),
            server: Some(server),
            ..discover
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match exchange(
            &socket,
            &request,
            Ipv4Addr::BROADCAST,
            &[Kind::Ack, Kind::Nak],
            wait.min(left),
        )? {
            Some(reply) if reply.kind == Kind::Ack => {
                return Ok(Lease {
                    reply,
                    server,
                    xid,
                    mac,
                    interface: interface.to_owned(),
                });
            }
            // Refused or unanswered: start over, as RFC 2131 says after a NAK.
            _ => {}
        }
    }
    Err(format!(
        "no DHCP server answered on {interface} within {} s",
        budget.as_secs()
    ))
}

impl Lease {
    /// Renews the lease at half its time, for as long as the process lives (in a thread of its
    /// own); a renewal that fails is retried at half the time left, and said on the console.
    pub fn keep(self) {
        let Some(mut lease) = self.reply.lease else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("dhcp".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(lease / 2);
                    match self.renew() {
                        Ok(reply) => lease = reply.lease.unwrap_or(lease),
                        Err(e) => {
                            crate::say!("network: {e}");
                            lease /= 2;
                            if lease < Duration::from_secs(2) {
                                crate::say!(
                                    "network: the DHCP lease of {} ends unrenewed; the address stays configured",
                                    self.reply.address
                                );
                                return;
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            crate::say!("network: no thread to renew the DHCP lease: {e}");
        }
    }

    /// One renewal: a REQUEST from the leased address, straight to the server that granted it.
    fn renew(&self) -> Result<Reply, String> {
        let socket = open(&self.interface, Duration::from_millis(100))?;
        let request = Packet {
            kind: Kind::Request,
            xid: self.xid.wrapping_add(1),
            mac: self.mac,
            requested: None,
            server: None,
            client: Some(self.reply.address),
        };
        match exchange(
            &socket,
            &request,
            self.server,
            &[Kind::Ack, Kind::Nak],
            Duration::from_secs(5),
        )? {
            Some(reply) if reply.kind == Kind::Ack => Ok(reply),
            Some(_) => Err(format!(
                "the DHCP server {} refused to renew {}",
                self.server, self.reply.address
            )),
            None => Err(format!(
                "the DHCP server {} did not answer the renewal of {}",
                self.server, self.reply.address
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAC: [u8; 6] = [0xaa, 0xff, 0, 0, 0, 2];
    const XID: u32 = 0x1234_5678;

    /// A server's reply, laid out as RFC 2131 says, with these options.
    fn reply(xid: u32, mac: [u8; 6], yiaddr: [u8; 4], options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut p = vec![0u8; FIXED_LEN];
        p[0] = BOOTREPLY;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&xid.to_be_bytes());
        p[16..20].copy_from_slice(&yiaddr);
        p[28..34].copy_from_slice(&mac);
        p.extend_from_slice(&MAGIC_COOKIE);
        for (option, value) in options {
            p.push(*option);
            p.push(u8::try_from(value.len()).unwrap());
            p.extend_from_slice(value);
        }
        p.push(OPT_END);
        p
    }

    fn offer() -> Vec<u8> {
        reply(
            XID,
            MAC,
            [169, 254, 0, 15],
            &[
                (OPT_MESSAGE_TYPE, &[2]),
                (OPT_SERVER_ID, &[169, 254, 0, 2]),
                (OPT_SUBNET_MASK, &[255, 255, 0, 0]),
                (OPT_ROUTER, &[169, 254, 0, 2, 10, 0, 0, 1]),
                (OPT_DNS, &[169, 254, 0, 3, 1, 1, 1, 1]),
                (OPT_LEASE_TIME, &86_400u32.to_be_bytes()),
            ],
        )
    }

    #[test]
    fn a_discover_broadcasts_from_no_address_and_asks_for_what_far_init_applies() {
        let p = Packet {
            kind: Kind::Discover,
            xid: XID,
            mac: MAC,
            requested: None,
            server: None,
            client: None,
        }
        .encode();
        assert_eq!(p[0], BOOTREQUEST);
        assert_eq!(p[4..8], XID.to_be_bytes());
        assert_eq!(
            p[10..12],
            BROADCAST_FLAG.to_be_bytes(),
            "replies must be broadcast"
        );
        assert_eq!(p[12..16], [0; 4], "no client address yet");
        assert_eq!(p[28..34], MAC);
        assert_eq!(p[FIXED_LEN..FIXED_LEN + 4], MAGIC_COOKIE);
        assert_eq!(p[FIXED_LEN + 4..FIXED_LEN + 7], [OPT_MESSAGE_TYPE, 1, 1]);
        let params = [
            OPT_PARAMETERS,
            4,
            OPT_SUBNET_MASK,
            OPT_ROUTER,
            OPT_DNS,
            OPT_LEASE_TIME,
        ];
        assert!(p.windows(params.len()).any(|w| w == params));
        assert!(p.len() >= 300, "BOOTP minimum size");
    }

    #[test]
    fn a_request_names_the_offer_and_its_server_and_a_renewal_comes_from_the_lease() {
        let request = Packet {
            kind: Kind::Request,
            xid: XID,
            mac: MAC,
            requested: Some(Ipv4Addr::new(169, 254, 0, 15)),
            server: Some(Ipv4Addr::new(169, 254, 0, 2)),
            client: None,
        }
        .encode();
        let options = &request[FIXED_LEN + 4..];
        assert_eq!(options[..3], [OPT_MESSAGE_TYPE, 1, 3]);
        assert_eq!(options[3..9], [OPT_REQUESTED_IP, 4, 169, 254, 0, 15]);
        assert_eq!(options[9..15], [OPT_SERVER_ID, 4, 169, 254, 0, 2]);

        let renewal = Packet {
            kind: Kind::Request,
            xid: XID,
            mac: MAC,
            requested: None,
            server: None,
            client: Some(Ipv4Addr::new(169, 254, 0, 15)),
        }
        .encode();
        assert_eq!(renewal[10..12], [0, 0], "a renewal is answered by unicast");
        assert_eq!(renewal[12..16], [169, 254, 0, 15]);
        assert!(
            !renewal[FIXED_LEN + 4..]
                .windows(2)
                .any(|w| w == [OPT_REQUESTED_IP, 4])
        );
    }

    #[test]
    fn an_offer_is_read_into_the_address_far_init_configures() {
        let offer = Reply::parse(&offer(), XID, MAC).expect("an offer");
        assert_eq!(offer.kind, Kind::Offer);
        assert_eq!(offer.server, Some(Ipv4Addr::new(169, 254, 0, 2)));
        assert_eq!(
            offer.nameservers,
            [Ipv4Addr::new(169, 254, 0, 3), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(offer.lease, Some(Duration::from_secs(86_400)));
        assert_eq!(
            offer.address(),
            Address {
                ip: Ipv4Addr::new(169, 254, 0, 15),
                prefix: 16,
                gateway: Some(Ipv4Addr::new(169, 254, 0, 2)),
            }
        );
    }

    #[test]
    fn replies_for_others_and_malformed_replies_are_ignored() {
        assert!(
            Reply::parse(&offer(), XID + 1, MAC).is_none(),
            "another transaction"
        );
        assert!(
            Reply::parse(&offer(), XID, [0; 6]).is_none(),
            "another client"
        );
        let mut request = offer();
        request[0] = BOOTREQUEST;
        assert!(Reply::parse(&request, XID, MAC).is_none(), "not a reply");
        let no_type = reply(XID, MAC, [10, 0, 0, 5], &[(OPT_SERVER_ID, &[10, 0, 0, 1])]);
        assert!(
            Reply::parse(&no_type, XID, MAC).is_none(),
            "no message type"
        );
        let holes = reply(
            XID,
            MAC,
            [10, 0, 0, 5],
            &[
                (OPT_MESSAGE_TYPE, &[5]),
                (OPT_SUBNET_MASK, &[255, 0, 255, 0]),
            ],
        );
        assert!(
            Reply::parse(&holes, XID, MAC).is_none(),
            "a mask that is no prefix"
        );
        let mut cut = offer();
        cut.truncate(FIXED_LEN + 4 + 5);
        assert!(
            Reply::parse(&cut, XID, MAC).is_none(),
            "an option cut short"
        );
        let infinite = reply(
            XID,
            MAC,
            [10, 0, 0, 5],
            &[(OPT_MESSAGE_TYPE, &[5]), (OPT_LEASE_TIME, &[255; 4])],
        );
        let ack = Reply::parse(&infinite, XID, MAC).expect("an ack");
        assert_eq!((ack.kind, ack.lease), (Kind::Ack, None));
        assert_eq!(ack.address().prefix, 8, "no mask: the class default");
    }

    proptest! {
        #[test]
        fn any_bytes_after_a_valid_header_are_read_without_panic(options in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut p = reply(XID, MAC, [10, 0, 0, 5], &[]);
            p.pop();
            p.extend_from_slice(&options);
            let _ = Reply::parse(&p, XID, MAC);
        }

        #[test]
        fn any_packet_is_read_without_panic(packet in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Reply::parse(&packet, XID, MAC);
        }
    }
}
