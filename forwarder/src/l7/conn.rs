//! One proxied WebSocket connection as a state machine.

/// One of the two peers of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// The peer on the other end of the proxy.
    pub fn other(self) -> Self {
        match self {
            Self::Client => Self::Backend,
            Self::Backend => Self::Client,
        }
    }
}
