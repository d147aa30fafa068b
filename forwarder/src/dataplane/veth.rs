//! veth peers. A veth queues native XDP_TX frames to its peer but wakes the
//! peer's NAPI only when the peer runs an XDP program in driver mode (GRO
//! alone leaves them in the ring until it overflows), so native XDP on a veth
//! whose peer has none drops everything it sends back out.

use std::io;
use std::path::PathBuf;

use super::attachment::named_netns;
use super::netlink;

/// The far end of a veth, as seen from the near end's namespace.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    /// The peer's namespace, when it is another one: its id here and, if
    /// `ip netns` or the host knows it, a path `nsenter --net=` takes.
    pub netns: Option<(i32, Option<PathBuf>)>,
    pub native_xdp: bool,
}

impl Peer {
    /// The command that gives the peer weir's pass-through program.
    pub fn attach_command(&self, instance: &str) -> String {
        let weir = format!("weir --instance {instance} attach-peer --dev {}", self.name);
        match &self.netns {
            None => format!("`{weir}`"),
            Some((_, Some(path))) => format!("`nsenter --net={} {weir}`", path.display()),
            Some((id, None)) => {
                format!("`{weir}` inside the peer's network namespace (netns id {id} from here)")
            }
        }
    }
}

/// The peer of `ifindex` if it is a veth; `None` for any other device.
pub fn peer_of(ifindex: u32) -> io::Result<Option<Peer>> {
    let near = netlink::link(ifindex, None)?;
    if near.kind.as_deref() != Some("veth") {
        return Ok(None);
    }
    let Some(peer_index) = near.link.filter(|i| *i != 0) else {
        // The peer is gone (its namespace is being torn down).
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("veth {} has no peer", near.name),
        ));
    };
    let far = netlink::link(peer_index, near.link_netnsid)?;
    let netns = near.link_netnsid.map(|id| (id, path_of_nsid(id)));
    Ok(Some(Peer {
        name: far.name,
        netns,
        native_xdp: far.native_xdp,
    }))
}

/// A path to the namespace this one calls `id`: a `/run/netns` entry, or
/// the host's namespace.
fn path_of_nsid(id: i32) -> Option<PathBuf> {
    let candidates = named_netns()
        .into_iter()
        .map(|(_, p)| p)
        .chain(std::iter::once(PathBuf::from("/proc/1/ns/net")));
    for path in candidates {
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        if netlink::nsid_of(&file.into()).ok().flatten() == Some(id) {
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_says_where_to_run() {
        let mut peer = Peer {
            name: "r-lb".into(),
            netns: None,
            native_xdp: false,
        };
        assert_eq!(
            peer.attach_command("edge"),
            "`weir --instance edge attach-peer --dev r-lb`"
        );
        peer.netns = Some((3, Some(PathBuf::from("/run/netns/router"))));
        assert_eq!(
            peer.attach_command("edge"),
            "`nsenter --net=/run/netns/router weir --instance edge attach-peer --dev r-lb`"
        );
        peer.netns = Some((3, None));
        assert!(peer.attach_command("edge").contains("netns id 3"));
    }
}
