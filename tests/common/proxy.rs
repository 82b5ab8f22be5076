//! A TCP fault proxy on loopback, between the library and PostgreSQL or Redis.
//!
//! It forwards bytes both ways and can, on command, add latency, stall (stop forwarding
//! without closing anything), cut every open connection, and refuse new ones (its listening
//! socket is closed, so connects get a real `ECONNREFUSED`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Faults {
    latency: Duration,
    stalled: bool,
    refusing: bool,
    /// Bumped by `cut_all`; connections opened under an older generation close.
    generation: u64,
}

pub struct FaultProxy {
    address: SocketAddr,
    faults: watch::Sender<Faults>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Where new connections go; open ones stay where they went.
    upstream: Arc<Mutex<SocketAddr>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (faults, _) = watch::channel(Faults {
            latency: Duration::ZERO,
            stalled: false,
            refusing: false,
            generation: 0,
        });
        let proxy = Arc::new(FaultProxy {
            address,
            faults,
            acceptor: Mutex::new(None),
            upstream: Arc::new(Mutex::new(upstream)),
        });
        proxy.spawn_acceptor(listener);
        proxy
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sends new connections to `upstream` from now on, as a DNS name re-pointed after a
    /// failover does; connections already open stay with the old server.
    pub fn repoint(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// Delays every forwarded chunk by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    /// Stops forwarding in both directions; connections stay open.
    pub fn stall(&self) {
        self.faults.send_modify(|f| f.stalled = true);
    }

    /// Closes every open connection (new ones are still accepted).
    pub fn cut_all(&self) {
        self.faults.send_modify(|f| f.generation += 1);
    }

    /// Closes the listening socket: new connections are refused until `heal`.
    pub fn refuse_new(&self) {
        self.faults.send_modify(|f| f.refusing = true);
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            acceptor.abort();
        }
    }

    /// Back to plain forwarding: no latency, no stall, accepting again.
    pub async fn heal(&self) {
        let was_refusing = self.faults.borrow().refusing;
        self.faults.send_modify(|f| {
            f.latency = Duration::ZERO;
            f.stalled = false;
            f.refusing = false;
        });
        if was_refusing {
            let listener = rebind(self.address).await;
            self.spawn_acceptor(listener);
        }
    }

    fn spawn_acceptor(&self, listener: TcpListener) {
        let faults = self.faults.clone();
        let upstream = Arc::clone(&self.upstream);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let faults = faults.subscribe();
                let upstream = *upstream.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        forward_connection(client, server, faults).await;
                    }
                });
            }
        });
        *self.acceptor.lock().unwrap() = Some(task);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            acceptor.abort();
        }
        // Closes every connection still open.
        self.faults.send_modify(|f| f.generation += 1);
    }
}

async fn rebind(address: SocketAddr) -> TcpListener {
    // The old listener's task was aborted; its socket closes as the task is dropped.
    for _ in 0..200 {
        if let Ok(listener) = TcpListener::bind(address).await {
            return listener;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("could not listen on {address} again");
}

async fn forward_connection(
    client: TcpStream,
    server: TcpStream,
    mut faults: watch::Receiver<Faults>,
) {
    let generation = faults.borrow().generation;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, faults.clone());
    let down = pump(server_read, client_write, faults.clone());
    let cut = async move {
        let _ = faults.wait_for(|f| f.generation != generation).await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut => {}
    }
    // Dropping both halves of both sockets closes the connection on both sides.
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // A stalled proxy does not even read, so the sender's data sits in kernel buffers.
        if faults.wait_for(|f| !f.stalled).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let latency = faults.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if faults.wait_for(|f| !f.stalled).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
