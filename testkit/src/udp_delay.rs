//! A UDP relay between one client and one server that delays every datagram by a
//! fixed time each way (a long path on loopback), logs the client's datagrams, and
//! can black-hole traffic (a leader that went silent). It also counts the client's
//! handshakes as the server's network sees them: distinct source connection IDs
//! in QUIC Initial packets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// A running relay; stops when dropped.
pub struct DelayProxy {
    /// Where clients send.
    pub addr: SocketAddr,
    /// (arrival, size) of every datagram from the client.
    pub log: Arc<Mutex<Vec<(Instant, usize)>>>,
    /// When each handshake (a new client connection ID in an Initial) began.
    handshakes: Arc<Mutex<Vec<Instant>>>,
    blackhole: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DelayProxy {
    /// Relays to `upstream` with `delay` each way. Runs on its own thread, so it
    /// can be started and dropped from inside or outside a tokio runtime.
    pub fn start(upstream: SocketAddr, delay: Duration) -> DelayProxy {
        let front = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind front");
        let back = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind back");
        front.set_nonblocking(true).expect("nonblocking");
        back.set_nonblocking(true).expect("nonblocking");
        let addr = front.local_addr().expect("front addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let blackhole = Arc::new(AtomicBool::new(false));
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let hs = handshakes.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (log2, bh) = (log.clone(), blackhole.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let front = Arc::new(UdpSocket::from_std(front).expect("front"));
                let back = Arc::new(UdpSocket::from_std(back).expect("back"));
                let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
                let forward = {
                    let (front, back, log, bh, client) = (
                        front.clone(),
                        back.clone(),
                        log2,
                        bh.clone(),
                        client.clone(),
                    );
                    async move {
                        let mut buf = vec![0u8; 65536];
                        let mut seen = std::collections::HashSet::new();
                        while let Ok((n, from)) = front.recv_from(&mut buf).await {
                            *client.lock().expect("client") = Some(from);
                            log.lock().expect("log").push((Instant::now(), n));
                            if let Some(scid) = initial_scid(&buf[..n]) {
                                if seen.insert(scid.to_vec()) {
                                    hs.lock().expect("handshakes").push(Instant::now());
                                }
                            }
                            if bh.load(Ordering::Relaxed) {
                                continue;
                            }
                            let data = buf[..n].to_vec();
                            let back = back.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = back.send_to(&data, upstream).await;
                            });
                        }
                    }
                };
                let backward = async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok((n, _)) = back.recv_from(&mut buf).await {
                        if bh.load(Ordering::Relaxed) {
                            continue;
                        }
                        let Some(to) = *client.lock().expect("client") else {
                            continue;
                        };
                        let data = buf[..n].to_vec();
                        let front = front.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = front.send_to(&data, to).await;
                        });
                    }
                };
                tokio::select! {
                    _ = forward => {}
                    _ = backward => {}
                    _ = stopped => {}
                }
            });
        });
        DelayProxy {
            addr,
            log,
            handshakes,
            blackhole,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Handshakes the client began at or after `from`.
    pub fn handshakes_since(&self, from: Instant) -> usize {
        self.handshakes
            .lock()
            .expect("handshakes")
            .iter()
            .filter(|t| **t >= from)
            .count()
    }

    /// Drops every datagram both ways while on.
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    /// Bytes the client sent within `window` after `from`.
    pub fn bytes_between(&self, from: Instant, window: Duration) -> usize {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(t, _)| *t >= from && *t < from + window)
            .map(|(_, n)| *n)
            .sum()
    }
}

/// The source connection ID of a QUIC v1 Initial packet (RFC 9000 §17.2.2): a long
/// header (bit 7) of type 0, then version, DCID and SCID, each length-prefixed.
fn initial_scid(d: &[u8]) -> Option<&[u8]> {
    let first = *d.first()?;
    if first & 0x80 == 0 || (first >> 4) & 0x03 != 0 {
        return None;
    }
    let dcid_len = *d.get(5)? as usize;
    let scid_at = 6 + dcid_len;
    let scid_len = *d.get(scid_at)? as usize;
    d.get(scid_at + 1..scid_at + 1 + scid_len)
}
