//! The guest's network, configured over rtnetlink (no `ip` binary, no unsafe ioctls).
//!
//! Sources, in order: `far.ip=ADDRESS/PREFIX[,GATEWAY]` on the kernel command line for the
//! first interface; otherwise the link-local address [`DEFAULT_ADDRESS`] without a default
//! route, which reaches the metadata service at 169.254.169.254 and, under QEMU's user-mode
//! network (`net=169.254.0.0/16`), the host at 169.254.0.2.

use std::net::Ipv4Addr;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, bind, recv, send, socket_with,
};

/// The address used when nothing else is configured.
pub const DEFAULT_ADDRESS: Address = Address {
    ip: Ipv4Addr::new(169, 254, 0, 15),
    prefix: 16,
    gateway: None,
};

/// An interface's IPv4 configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// Reads `far.ip=` from a kernel command line.
///
/// # Errors
/// A sentence naming the malformed value.
pub fn from_cmdline(cmdline: &str) -> Result<Option<Address>, String> {
    let Some(value) = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("far.ip="))
    else {
        return Ok(None);
    };
    let bad =
        || format!("far.ip={value:?}: use ADDRESS/PREFIX[,GATEWAY], e.g. 10.0.0.5/24,10.0.0.1");
    let (cidr, gateway) = value
        .split_once(',')
        .map_or((value, None), |(c, g)| (c, Some(g)));
    let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let ip = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
    let gateway = gateway.map(|g| g.parse().map_err(|_| bad())).transpose()?;
    Ok(Some(Address {
        ip,
        prefix,
        gateway,
    }))
}

/// Brings up `lo` and the first Ethernet interface with its address and route.
///
/// # Errors
/// A sentence naming the step that failed.
pub fn configure(cmdline: &str) -> Result<(), String> {
    let address = from_cmdline(cmdline)?.unwrap_or(DEFAULT_ADDRESS);
    let rtnl = Rtnl::open()?;
    let lo = if_index("lo")?;
    rtnl.link_up(lo)
        .map_err(|e| format!("bringing up lo: {e}"))?;
    let eth = if_index("eth0")?;
    rtnl.link_up(eth)
        .map_err(|e| format!("bringing up eth0: {e}"))?;
    rtnl.add_address(eth, &address)
        .map_err(|e| format!("adding {}/{} to eth0: {e}", address.ip, address.prefix))?;
    if let Some(gateway) = address.gateway {
        rtnl.add_default_route(eth, gateway)
            .map_err(|e| format!("adding default route via {gateway}: {e}"))?;
    }
    Ok(())
}

fn if_index(name: &str) -> Result<u32, String> {
    let path = format!("/sys/class/net/{name}/ifindex");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return text
                    .trim()
                    .parse()
                    .map_err(|_| format!("{path}: not a number"));
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => return Err(format!("interface {name} not found ({path}: {e})")),
        }
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// A netlink route socket.
struct Rtnl {
    fd: rustix::fd::OwnedFd,
}

/// Builds one netlink message: header, fixed body, then attributes.
fn message(kind: u16, flags: u16, body: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut payload = body.to_vec();
    for (kind, value) in attrs {
        let len = 4 + value.len();
        payload.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        payload.extend_from_slice(&kind.to_ne_bytes());
        payload.extend_from_slice(value);
        payload.resize(payload.len().next_multiple_of(4), 0);
    }
    let total = 16 + payload.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    msg.extend_from_slice(&payload);
    msg
}

impl Rtnl {
    fn open() -> Result<Self, String> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| format!("opening a netlink socket: {e}"))?;
        bind(&fd, &SocketAddrNetlink::new(0, 0))
            .map_err(|e| format!("binding the netlink socket: {e}"))?;
        Ok(Self { fd })
    }

    /// Sends a request and waits for the kernel's acknowledgement.
    fn request(&self, msg: &[u8]) -> Result<(), String> {
        send(&self.fd, msg, SendFlags::empty()).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let (n, _) = recv(&self.fd, &mut buf, RecvFlags::empty()).map_err(|e| e.to_string())?;
        let reply = &buf[..n];
        if reply.len() >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == NLMSG_ERROR {
            let errno = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return match errno {
                0 => Ok(()),
                e => Err(rustix::io::Errno::from_raw_os_error(-e).to_string()),
            };
        }
        Err("unexpected netlink reply".into())
    }

    fn link_up(&self, index: u32) -> Result<(), String> {
        let mut body = vec![0u8, 0, 0, 0]; // family, pad, type
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
        body.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
        self.request(&message(RTM_NEWLINK, 0, &body, &[]))
    }

    fn add_address(&self, index: u32, address: &Address) -> Result<(), String> {
        let mut body = vec![AF_INET, address.prefix, 0, RT_SCOPE_UNIVERSE];
        body.extend_from_slice(&index.to_ne_bytes());
        let ip = address.ip.octets();
        let flags = NLM_F_CREATE | NLM_F_REPLACE;
        self.request(&message(
            RTM_NEWADDR,
            flags,
            &body,
            &[(IFA_LOCAL, &ip), (IFA_ADDRESS, &ip)],
        ))
    }

    fn add_default_route(&self, index: u32, gateway: Ipv4Addr) -> Result<(), String> {
        let mut body = vec![
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        let flags = NLM_F_CREATE | NLM_F_REPLACE;
        self.request(&message(
            RTM_NEWROUTE,
            flags,
            &body,
            &[
                (RTA_GATEWAY, &gateway.octets()),
                (RTA_OIF, &index.to_ne_bytes()),
            ],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_ip_on_the_kernel_command_line_is_read() {
        assert_eq!(from_cmdline("console=ttyS0 quiet").unwrap(), None);
        assert_eq!(
            from_cmdline("quiet far.ip=10.0.0.5/24,10.0.0.1 panic=-1").unwrap(),
            Some(Address {
                ip: Ipv4Addr::new(10, 0, 0, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1))
            })
        );
        assert_eq!(
            from_cmdline("far.ip=10.0.0.5/8").unwrap().unwrap().gateway,
            None
        );
        for bad in [
            "far.ip=10.0.0.5",
            "far.ip=10.0.0.5/33",
            "far.ip=x/24",
            "far.ip=10.0.0.5/24,gw",
        ] {
            assert!(
                from_cmdline(bad)
                    .unwrap_err()
                    .contains("e.g. 10.0.0.5/24,10.0.0.1"),
                "{bad}"
            );
        }
    }

    #[test]
    fn netlink_messages_are_laid_out_as_the_kernel_reads_them() {
        let msg = message(
            RTM_NEWADDR,
            NLM_F_CREATE,
            &[2, 16, 0, 0, 1, 0, 0, 0],
            &[(IFA_LOCAL, &[169, 254, 0, 15])],
        );
        assert_eq!(msg.len(), 16 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes([msg[6], msg[7]]),
            NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(&msg[24..26], &8u16.to_ne_bytes(), "attribute length");
        assert_eq!(&msg[28..32], &[169, 254, 0, 15]);
    }
}
