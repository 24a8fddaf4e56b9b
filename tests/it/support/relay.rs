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
    /// While set, what the service sends is held back (a slow network, a stalled peer); it
    /// goes on, in order, once released.
    held: tokio::sync::watch::Sender<bool>,
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
        let (held, holding) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if refusing.load(Ordering::Relaxed) {
                    drop(inbound);
                    counted.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let holding = holding.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(upstream).await {
                        let (mut from_client, to_client) = inbound.into_split();
                        let (from_service, mut to_service) = outbound.into_split();
                        let up = tokio::io::copy(&mut from_client, &mut to_service);
                        tokio::select! {
                            _ = up => {}
                            _ = forward_unless_held(from_service, to_client, holding) => {}
                        }
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Relay { addr, connections, down, refused, held, accept }
    }

    /// Holds back what the service sends on every connection (`true`) or lets it go on.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
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

/// Copies `from` to `to`, waiting while `holding` is set before each write.
async fn forward_unless_held(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut holding: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if holding.wait_for(|held| !held).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
