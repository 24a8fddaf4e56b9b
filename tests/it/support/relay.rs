//! A loopback TCP relay in front of a real service, to cut every connection at once (as a
//! network failure or a broker restart would), like lapin's own recovery tests do.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Relay {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// While set, new connections are closed at once (the service looks down).
    down: Arc<AtomicBool>,
    /// Connections closed that way.
    refused: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = connections.clone();
        let down: Arc<AtomicBool> = Arc::default();
        let refusing = down.clone();
        let refused: Arc<AtomicUsize> = Arc::default();
        let counted = refused.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::Relaxed) {
                    drop(inbound);
                    counted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Relay { addr, connections, down, refused, accept }
    }

    /// Drops every relayed connection (new ones are still accepted).
    pub fn cut(&self) -> usize {
        let mut connections = self.connections.lock().unwrap();
        let n = connections.iter().filter(|t| !t.is_finished()).count();
        for task in connections.drain(..) {
            task.abort();
        }
        n
    }
}

impl Relay {
    /// How many connections were closed while the service was down.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes the service away (cutting every connection) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        if down {
            self.cut();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
