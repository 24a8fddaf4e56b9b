//! Which node of a RabbitMQ cluster a worker talks to, and when it moves to another.
//!
//! `amqp.url` may list the nodes of one cluster. Every node serves every queue (a quorum queue's
//! leader may sit anywhere; the node a client is connected to forwards to it), so the worker
//! needs only one node at a time: it starts at the first URL and stays on a node while it
//! works. When a node is gone — it refuses the connection, or the session on it breaks — the
//! worker goes straight to the next one, and pauses (with the supervisor's backoff) only after
//! every node of the list failed in a row, so a dead node costs a reconnect, not a backoff.

use std::time::Duration;

use crate::config::BrokerUrls;

/// A session that stood this long proved the cluster reachable: when it breaks, a fresh round
/// of every node begins before the next backoff. A shorter one counts as one more failed node,
/// so sessions that break as soon as they open still pause once per round instead of spinning.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);

/// When to try the node [`NodeRotation::current`] now names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextTry {
    /// At once: some node of this round has not been tried yet.
    Now,
    /// After the supervisor's backoff: every node failed in a row.
    AfterBackoff,
}

/// The list of node URLs and where the worker is in it.
#[derive(Debug, Clone)]
pub struct NodeRotation {
    urls: Vec<String>,
    current: usize,
    /// Nodes that failed one after the other in the current round.
    misses: usize,
}

impl NodeRotation {
    pub fn new(urls: &BrokerUrls) -> NodeRotation {
        NodeRotation { urls: urls.as_slice().to_vec(), current: 0, misses: 0 }
    }

    /// The node to use now.
    pub fn current(&self) -> &str {
        self.urls.get(self.current).map_or("", String::as_str)
    }

    /// Which node that is, counted from 1, and how many there are: for logs.
    pub fn position(&self) -> (usize, usize) {
        (self.current + 1, self.urls.len())
    }

    /// No session could be opened on the current node (refused, timed out, or the broker
    /// turned down the declarations or the consumer): move on to the next.
    pub fn cannot_open(&mut self) -> NextTry {
        self.miss()
    }

    /// The session on the current node broke after standing for `lasted`: move on to the next.
    pub fn session_broke(&mut self, lasted: Duration) -> NextTry {
        if lasted >= STABLE_SESSION {
            self.misses = 0;
        }
        self.miss()
    }

    fn miss(&mut self) -> NextTry {
        let nodes = self.urls.len().max(1);
        self.current = (self.current + 1) % nodes;
        self.misses += 1;
        if self.misses < nodes {
            NextTry::Now
        } else {
            self.misses = 0;
            NextTry::AfterBackoff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation(n: usize) -> NodeRotation {
        let list = (1..=n).map(|i| format!("amqp://u:pw@node{i}:5672/%2f")).collect::<Vec<_>>().join(",");
        NodeRotation::new(&BrokerUrls::parse_list(&list).expect("a list"))
    }

    fn host(rotation: &NodeRotation) -> &str {
        let current = rotation.current();
        &current[current.find('@').map_or(0, |at| at + 1)..current.rfind(':').unwrap_or(current.len())]
    }

    #[test]
    fn starts_at_the_first_node() {
        let nodes = rotation(3);
        assert_eq!(host(&nodes), "node1");
        assert_eq!(nodes.position(), (1, 3));
    }

    #[test]
    fn a_dead_node_is_skipped_at_once_and_a_dead_cluster_backs_off_once_per_round() {
        let mut nodes = rotation(3);
        assert_eq!(nodes.cannot_open(), NextTry::Now);
        assert_eq!(host(&nodes), "node2");
        assert_eq!(nodes.cannot_open(), NextTry::Now);
        assert_eq!(host(&nodes), "node3");
        assert_eq!(nodes.cannot_open(), NextTry::AfterBackoff, "every node failed in a row");
        assert_eq!(host(&nodes), "node1", "the next round starts over from the first");
        assert_eq!(nodes.cannot_open(), NextTry::Now, "a new round tries every node again");
    }

    #[test]
    fn a_broken_session_moves_to_the_next_node_without_a_pause() {
        let mut nodes = rotation(3);
        assert_eq!(nodes.session_broke(Duration::from_secs(60)), NextTry::Now);
        assert_eq!(host(&nodes), "node2");
        assert_eq!(nodes.cannot_open(), NextTry::Now, "node3 is still to be tried");
        assert_eq!(host(&nodes), "node3");
        assert_eq!(nodes.session_broke(Duration::from_secs(60)), NextTry::Now, "it stood: a fresh round");
        assert_eq!(host(&nodes), "node1", "the list wraps around");
    }

    #[test]
    fn sessions_that_break_at_once_still_pause_once_per_round() {
        let mut nodes = rotation(3);
        let brief = STABLE_SESSION / 10;
        assert_eq!(nodes.session_broke(brief), NextTry::Now);
        assert_eq!(nodes.session_broke(brief), NextTry::Now);
        assert_eq!(nodes.session_broke(brief), NextTry::AfterBackoff);
        assert_eq!(host(&nodes), "node1");
    }

    #[test]
    fn a_single_node_backs_off_after_every_failure_as_before() {
        let mut nodes = rotation(1);
        assert_eq!(nodes.cannot_open(), NextTry::AfterBackoff);
        assert_eq!(nodes.session_broke(Duration::from_secs(3600)), NextTry::AfterBackoff);
        assert_eq!(host(&nodes), "node1");
    }
}
