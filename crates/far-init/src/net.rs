//! The guest's network, configured over rtnetlink (no `ip` binary, no unsafe ioctls).
//!
//! Sources, in order, per interface:
//! 1. `network-config=<base64>` on the kernel command line: cloud-init network-config v2, as
//!    flintlockd passes it to Firecracker guests (`add_network_config`). Interfaces are matched by
//!    `match.macaddress`, else by name; static `addresses`, `gateway4` and
//!    `nameservers.addresses` (written to `/etc/resolv.conf`) are applied; an interface with
//!    `dhcp4: true` and no static address gets its address, router and name servers by DHCP
//!    ([`crate::dhcp`]), and keeps the lease renewed.
//! 2. For `eth0`, when network-config gives it no address (none asked, or no DHCP answer):
//!    `far.ip=ADDRESS/PREFIX[,GATEWAY]`, else the link-local address [`DEFAULT_ADDRESS`] without
//!    a default route, which reaches the metadata service at 169.254.169.254 (flintlockd's own
//!    interface under Firecracker) and, under QEMU's user-mode network (`net=169.254.0.0/16`),
//!    the host at 169.254.0.2.

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
    parse_address(value).map(Some).ok_or_else(|| {
        format!("far.ip={value:?}: use ADDRESS/PREFIX[,GATEWAY], e.g. 10.0.0.5/24,10.0.0.1")
    })
}

/// `ADDRESS/PREFIX[,GATEWAY]`.
fn parse_address(value: &str) -> Option<Address> {
    let (cidr, gateway) = value
        .split_once(',')
        .map_or((value, None), |(c, g)| (c, Some(g)));
    let (ip, prefix) = cidr.split_once('/')?;
    let ip = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    let gateway = match gateway {
        Some(g) => Some(g.parse().ok()?),
        None => None,
    };
    Some(Address {
        ip,
        prefix,
        gateway,
    })
}

/// One interface of a network-config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// The name it has in the config (its interface name unless matched by MAC).
    pub name: String,
    /// `match.macaddress`, lower case.
    pub mac: Option<String>,
    /// The static address, when `addresses` gives one.
    pub address: Option<Address>,
    /// `dhcp4: true`.
    pub dhcp: bool,
    /// `nameservers.addresses`.
    pub nameservers: Vec<Ipv4Addr>,
}

#[derive(serde::Deserialize)]
struct NetworkConfig {
    version: u32,
    #[serde(default)]
    ethernets: std::collections::BTreeMap<String, Ethernet>,
}

#[derive(serde::Deserialize)]
struct Ethernet {
    #[serde(rename = "match", default)]
    matcher: Option<Match>,
    #[serde(default)]
    dhcp4: Option<bool>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    gateway4: Option<String>,
    #[serde(default)]
    nameservers: Option<Nameservers>,
}

#[derive(serde::Deserialize)]
struct Match {
    macaddress: Option<String>,
}

#[derive(serde::Deserialize)]
struct Nameservers {
    #[serde(default)]
    addresses: Vec<String>,
}

/// Upper bound on the decoded network-config, against a hostile command line.
const MAX_NETWORK_CONFIG: usize = 64 * 1024;

/// Reads `network-config=` (base64 cloud-init network-config v2) from a kernel command line.
///
/// # Errors
/// A sentence naming what is malformed.
pub fn network_config(cmdline: &str) -> Result<Vec<Interface>, String> {
    use base64::Engine as _;
    let Some(value) = cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("network-config="))
    else {
        return Ok(Vec::new());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| format!("network-config: not base64 ({e})"))?;
    if bytes.len() > MAX_NETWORK_CONFIG {
        return Err(format!(
            "network-config: {} bytes, at most {MAX_NETWORK_CONFIG}",
            bytes.len()
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| "network-config: not UTF-8".to_owned())?;
    // far-host writes JSON, which is YAML: read it with the JSON parser the run configuration
    // needs anyway, so software emulation translates one parser at boot, not two (~30 ms).
    let config: NetworkConfig = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| format!("network-config: {e}"))?
    } else {
        serde_saphyr::from_str(&text).map_err(|e| format!("network-config: {e}"))?
    };
    if config.version != 2 {
        return Err(format!(
            "network-config: version {} (far-init reads version 2)",
            config.version
        ));
    }
    config
        .ethernets
        .into_iter()
        .map(|(name, e)| {
            let address = match (e.addresses.first(), &e.gateway4) {
                (Some(cidr), gateway) => {
                    let value = match gateway {
                        Some(g) => format!("{cidr},{}", g.trim_end_matches("/32")),
                        None => cidr.clone(),
                    };
                    Some(parse_address(&value).ok_or_else(|| format!("network-config: ethernets.{name}: address {cidr:?} or gateway4 {gateway:?} is not IPv4"))?)
                }
                (None, _) => None,
            };
            let nameservers = e
                .nameservers
                .map(|n| n.addresses)
                .unwrap_or_default()
                .iter()
                .map(|a| a.parse().map_err(|_| format!("network-config: ethernets.{name}: nameserver {a:?} is not IPv4")))
                .collect::<Result<_, _>>()?;
            Ok(Interface {
                mac: e.matcher.and_then(|m| m.macaddress).map(|m| m.to_ascii_lowercase()),
                name,
                address,
                dhcp: e.dhcp4.unwrap_or(false),
                nameservers,
            })
        })
        .collect()
}

/// Brings up `lo` and the guest's interfaces with their addresses and routes, and says what it
/// did on the console.
///
/// # Errors
/// A sentence naming the step that failed.
pub fn configure(cmdline: &str) -> Result<Vec<String>, String> {
    let configured = network_config(cmdline)?;
    let rtnl = Rtnl::open()?;
    let lo = if_index("lo")?;
    rtnl.link_up(lo)
        .map_err(|e| format!("bringing up lo: {e}"))?;
    let mut said = Vec::new();
    let mut eth0_done = false;
    let mut nameservers = Vec::new();
    for interface in &configured {
        let Some(name) = find_interface(interface) else {
            said.push(format!(
                "network-config: no interface {} here; skipped",
                interface.name
            ));
            continue;
        };
        let index = if_index(&name)?;
        rtnl.link_up(index)
            .map_err(|e| format!("bringing up {name}: {e}"))?;
        match interface.address {
            Some(address) => {
                apply(&rtnl, index, &name, &address)?;
                said.push(format!(
                    "{name} {}/{} (network-config)",
                    address.ip, address.prefix
                ));
                eth0_done |= name == "eth0";
            }
            None if interface.dhcp => match by_dhcp(&rtnl, index, &name) {
                Ok(lease) => {
                    let address = lease.reply.address();
                    said.push(format!(
                        "{name} {}/{}{} (DHCP from {}, lease {})",
                        address.ip,
                        address.prefix,
                        address
                            .gateway
                            .map(|g| format!(" via {g}"))
                            .unwrap_or_default(),
                        lease.server,
                        lease
                            .reply
                            .lease
                            .map_or("infinite".to_owned(), |l| format!("{} s", l.as_secs()))
                    ));
                    nameservers.extend(lease.reply.nameservers.iter().copied());
                    eth0_done |= name == "eth0";
                    lease.keep();
                }
                Err(e) => said.push(format!(
                    "{name}: {e}; the interface is up without an address"
                )),
            },
            None => {}
        }
        nameservers.extend(interface.nameservers.iter().copied());
    }
    if !eth0_done {
        let (address, source) = match from_cmdline(cmdline)? {
            Some(address) => (address, "far.ip"),
            None => (DEFAULT_ADDRESS, "link-local default"),
        };
        let eth = if_index("eth0")?;
        rtnl.link_up(eth)
            .map_err(|e| format!("bringing up eth0: {e}"))?;
        apply(&rtnl, eth, "eth0", &address)?;
        said.push(format!("eth0 {}/{} ({source})", address.ip, address.prefix));
    }
    if !nameservers.is_empty() {
        let text: String = nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        match std::fs::write("/etc/resolv.conf", text) {
            Ok(()) => said.push(format!(
                "{} nameserver(s) in /etc/resolv.conf",
                nameservers.len()
            )),
            Err(e) => said.push(format!("/etc/resolv.conf not written: {e}")),
        }
    }
    Ok(said)
}

/// How long an interface waits for a DHCP server before going on without an address.
const DHCP_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

/// Obtains a lease on an interface that is up, and configures its address and route.
fn by_dhcp(rtnl: &Rtnl, index: u32, name: &str) -> Result<crate::dhcp::Lease, String> {
    let path = format!("/sys/class/net/{name}/address");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let mac = parse_mac(text.trim()).ok_or_else(|| format!("{path}: {text:?} is not a MAC"))?;
    let lease = crate::dhcp::obtain(name, mac, DHCP_BUDGET)?;
    apply(rtnl, index, name, &lease.reply.address())?;
    Ok(lease)
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn apply(rtnl: &Rtnl, index: u32, name: &str, address: &Address) -> Result<(), String> {
    rtnl.add_address(index, address)
        .map_err(|e| format!("adding {}/{} to {name}: {e}", address.ip, address.prefix))?;
    if let Some(gateway) = address.gateway {
        rtnl.add_default_route(index, gateway)
            .map_err(|e| format!("adding default route via {gateway}: {e}"))?;
    }
    Ok(())
}

/// The interface a network-config entry means: by MAC when it says one, else by name.
fn find_interface(interface: &Interface) -> Option<String> {
    let Some(mac) = &interface.mac else {
        return std::path::Path::new("/sys/class/net")
            .join(&interface.name)
            .exists()
            .then(|| interface.name.clone());
    };
    let has_mac = |name: &std::ffi::OsStr| {
        let path = std::path::Path::new("/sys/class/net")
            .join(name)
            .join("address");
        std::fs::read_to_string(path).is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
    };
    // Interfaces appear as their drivers load: give them the time `if_index` gives eth0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The interface named is nearly always the one: one read, not a directory scan (a
        // cold sysfs walk costs ~15 ms under software emulation).
        let found = if has_mac(interface.name.as_ref()) {
            Some(interface.name.clone())
        } else {
            std::fs::read_dir("/sys/class/net")
                .ok()?
                .flatten()
                .find(|e| has_mac(&e.file_name()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
        };
        if found.is_some() || std::time::Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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

    fn cmdline_with(config: &str) -> String {
        use base64::Engine as _;
        format!(
            "console=ttyS0 network-config={} quiet",
            base64::engine::general_purpose::STANDARD.encode(config)
        )
    }

    #[test]
    fn network_config_v2_as_flintlockd_writes_it_is_read() {
        let yaml = "version: 2\nethernets:\n  eth1:\n    match:\n      macaddress: AA:FF:00:00:00:02\n    addresses:\n    - 10.0.0.5/24\n    gateway4: 10.0.0.1/32\n    nameservers:\n      addresses:\n      - 10.0.0.53\n  eth2:\n    dhcp4: true\n";
        let interfaces = network_config(&cmdline_with(yaml)).unwrap();
        assert_eq!(
            interfaces,
            [
                Interface {
                    name: "eth1".into(),
                    mac: Some("aa:ff:00:00:00:02".into()),
                    address: Some(Address {
                        ip: Ipv4Addr::new(10, 0, 0, 5),
                        prefix: 24,
                        gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    }),
                    dhcp: false,
                    nameservers: vec![Ipv4Addr::new(10, 0, 0, 53)],
                },
                Interface {
                    name: "eth2".into(),
                    mac: None,
                    address: None,
                    dhcp: true,
                    nameservers: vec![],
                },
            ]
        );
        // JSON is YAML: what far-host writes reads the same.
        let json = r#"{"version":2,"ethernets":{"eth0":{"addresses":["169.254.0.50/16"]}}}"#;
        assert_eq!(
            network_config(&cmdline_with(json)).unwrap()[0].address,
            Some(Address {
                ip: Ipv4Addr::new(169, 254, 0, 50),
                prefix: 16,
                gateway: None
            })
        );
        assert!(network_config("console=ttyS0").unwrap().is_empty());
    }

    #[test]
    fn a_bad_network_config_is_refused_naming_what_is_wrong() {
        assert_eq!(
            network_config("network-config=%%%").unwrap_err(),
            "network-config: not base64 (Invalid symbol 37, offset 0.)"
        );
        assert_eq!(
            network_config(&cmdline_with("version: 1\n")).unwrap_err(),
            "network-config: version 1 (far-init reads version 2)"
        );
        assert_eq!(
            network_config(&cmdline_with(
                "version: 2\nethernets:\n  eth0:\n    addresses: [fe80::1/64]\n"
            ))
            .unwrap_err(),
            "network-config: ethernets.eth0: address \"fe80::1/64\" or gateway4 None is not IPv4"
        );
        // JSON (far-host's form) is read by the JSON parser: its errors name the place too.
        assert_eq!(
            network_config(&cmdline_with(
                r#"{"version":2,"ethernets":{"eth0":{"addresses":"10.0.0.5/24"}}}"#
            ))
            .unwrap_err(),
            "network-config: invalid type: string \"10.0.0.5/24\", expected a sequence at line 1 column 59"
        );
    }

    #[test]
    fn macs_are_read_as_sysfs_writes_them() {
        assert_eq!(
            super::parse_mac("02:fa:00:00:00:3f"),
            Some([0x02, 0xfa, 0, 0, 0, 0x3f])
        );
        for bad in [
            "",
            "02:fa:00:00:00",
            "02:fa:00:00:00:3f:01",
            "02:fa:00:00:00:zz",
        ] {
            assert_eq!(super::parse_mac(bad), None, "{bad:?}");
        }
    }

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
