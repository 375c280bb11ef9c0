//! Who may start a handshake with the ingest, before anyone is known.
//!
//! A client's identity is only known once its handshake is done (TLS 1.3 sends
//! the client's certificate last), so places for handshakes in progress are
//! handed out by address ([`source_of`]: an IPv4 address, an IPv6 /64):
//!
//! - an address (exactly: not its /64) that holds a connection of an allowed
//!   client, or held one within [`KNOWN_FOR`], is *known*; known addresses
//!   have a pool of their own of `max_connections` handshakes in progress, so
//!   that strangers starting and stalling handshakes from however many
//!   addresses cannot keep a searcher that connected before from coming back
//!   (the set is kept in memory: after a restart every searcher comes back as
//!   a stranger once);
//! - every other address shares the other pool of `max_connections`, and may
//!   start at most [`STARTS_PER_MINUTE`] handshakes a minute (as Agave's TPU
//!   allows per IP address);
//! - any address (a stranger's: its /64) has at most [`MAX_PER_SOURCE`]
//!   handshakes in progress at once.
//!
//! Everything is bounded: at most [`MAX_KNOWN`] known addresses (of those with
//! no connection, the one longest unseen makes way), at most [`MAX_COUNTED`]
//! strangers' addresses counted a minute (beyond, strangers wait for the next
//! minute).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Most handshakes in progress from one address.
pub const MAX_PER_SOURCE: usize = 4;
/// Most handshakes an address that is not known starts in a minute.
pub const STARTS_PER_MINUTE: u32 = 8;
/// How long an address stays known after its allowed client's last connection
/// ended (or its last handshake, refused for the connection bounds).
pub const KNOWN_FOR: Duration = Duration::from_secs(3600);
/// Known addresses kept at most (more than connections there can be at once:
/// `max_connections` is at most 4 096, so an address holding one always has
/// its entry).
pub const MAX_KNOWN: usize = 8192;
const _: () = assert!(MAX_KNOWN > super::MAX_CONNECTIONS);
/// Addresses that are not known counted in one minute at most.
pub const MAX_COUNTED: usize = 65_536;

const MINUTE: Duration = Duration::from_secs(60);

/// Whose share of the handshake places a client's address counts against: the
/// address itself (IPv4, or IPv4-mapped IPv6), an IPv6 address's /64 (one host
/// commonly holds a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        other => other,
    }
}

/// A handshake let start: hand it back to [`Handshakes::ended`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    source: IpAddr,
    known: bool,
}

/// Why a handshake may not start (the refusal's detail).
pub type Refused = &'static str;

/// A known address.
#[derive(Debug, Clone, Copy)]
struct Known {
    live: usize,
    seen: Instant,
}

/// The ingest's handshake places (one per endpoint, on the ingest thread).
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    /// Handshakes in progress: of addresses not known, of known ones.
    in_progress: [usize; 2],
    by_source: HashMap<IpAddr, usize>,
    /// Known addresses: their allowed clients' connections, and when one was
    /// last seen.
    known: HashMap<IpAddr, Known>,
    /// This minute's starts by addresses not known.
    minute: Instant,
    started: HashMap<IpAddr, u32>,
}

impl Handshakes {
    /// Places for `max` handshakes in progress in each pool.
    pub fn new(max: usize, now: Instant) -> Handshakes {
        Handshakes {
            max,
            in_progress: [0; 2],
            by_source: HashMap::new(),
            known: HashMap::new(),
            minute: now,
            started: HashMap::new(),
        }
    }

    /// A place for a handshake from `ip`, or why there is none.
    pub fn start(&mut self, ip: IpAddr, now: Instant) -> Result<Place, Refused> {
        let known = self
            .known
            .get(&ip.to_canonical())
            .is_some_and(|k| k.live > 0 || now.saturating_duration_since(k.seen) < KNOWN_FOR);
        // A known address's handshakes count by the address itself: a stranger
        // on its /64 cannot take its places.
        let source = if known {
            ip.to_canonical()
        } else {
            source_of(ip)
        };
        if self.by_source.get(&source).copied().unwrap_or(0) >= MAX_PER_SOURCE {
            return Err("this address's handshakes in progress at their bound");
        }
        if self.in_progress[usize::from(known)] >= self.max {
            return Err(if known {
                "handshakes in progress at their bound (max_connections)"
            } else {
                "handshakes in progress from addresses no allowed client connected \
                 from lately at their bound (max_connections)"
            });
        }
        if !known {
            if now.saturating_duration_since(self.minute) >= MINUTE {
                self.minute = now;
                self.started.clear();
            }
            let counted = self.started.len();
            match self.started.get_mut(&source) {
                Some(n) if *n >= STARTS_PER_MINUTE => {
                    return Err("this address started its handshakes for this minute")
                }
                Some(n) => *n += 1,
                None if counted >= MAX_COUNTED => {
                    return Err("too many addresses started handshakes this minute")
                }
                None => {
                    self.started.insert(source, 1);
                }
            }
        }
        self.in_progress[usize::from(known)] += 1;
        *self.by_source.entry(source).or_insert(0) += 1;
        Ok(Place { source, known })
    }

    /// `place`'s handshake is over (done, failed or timed out).
    pub fn ended(&mut self, place: Place) {
        let pool = &mut self.in_progress[usize::from(place.known)];
        *pool = pool.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&place.source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&place.source);
            }
        }
    }

    /// An allowed client's connection from `ip` began: the address is known
    /// while it lasts, and [`KNOWN_FOR`] after.
    pub fn connected(&mut self, ip: IpAddr, now: Instant) {
        if let Some(k) = self.entry(ip, now) {
            k.live += 1;
            k.seen = now;
        }
    }

    /// An allowed client's connection from `ip` ended.
    pub fn disconnected(&mut self, ip: IpAddr, now: Instant) {
        if let Some(k) = self.known.get_mut(&ip.to_canonical()) {
            k.live = k.live.saturating_sub(1);
            k.seen = now;
        }
    }

    /// An allowed client completed a handshake from `ip` and was refused a
    /// connection (its bounds): known for [`KNOWN_FOR`] from `now`.
    pub fn seen(&mut self, ip: IpAddr, now: Instant) {
        if let Some(k) = self.entry(ip, now) {
            k.seen = now;
        }
    }

    /// `ip`'s entry, made room for: of the addresses holding no connection,
    /// expired ones first, then the one longest unseen. None if every one
    /// holds a connection.
    fn entry(&mut self, ip: IpAddr, now: Instant) -> Option<&mut Known> {
        let ip = ip.to_canonical();
        if !self.known.contains_key(&ip) && self.known.len() >= MAX_KNOWN {
            self.known
                .retain(|_, k| k.live > 0 || now.saturating_duration_since(k.seen) < KNOWN_FOR);
            if self.known.len() >= MAX_KNOWN {
                let oldest = self
                    .known
                    .iter()
                    .filter(|(_, k)| k.live == 0)
                    .min_by_key(|(_, k)| k.seen)
                    .map(|(&a, _)| a);
                self.known.remove(&oldest?);
            }
        }
        Some(self.known.entry(ip).or_insert(Known { live: 0, seen: now }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshakes_count_per_address_and_per_ipv6_64() {
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            source_of(ip("2001:db8:1:2::1")),
            source_of(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:2::1")),
            source_of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("::ffff:192.0.2.7"));
    }

    #[test]
    fn a_known_address_has_places_strangers_cannot_take() {
        let t = Instant::now();
        let mut h = Handshakes::new(8, t);
        h.seen(ip("192.0.2.1"), t);
        // Strangers from two addresses fill their pool.
        let mut held = Vec::new();
        for a in ["198.51.100.1", "198.51.100.2"] {
            for _ in 0..MAX_PER_SOURCE {
                held.push(h.start(ip(a), t).unwrap());
            }
        }
        assert!(h.start(ip("198.51.100.3"), t).is_err());
        // The known address still starts its own, up to its share.
        for _ in 0..MAX_PER_SOURCE {
            h.start(ip("192.0.2.1"), t).unwrap();
        }
        assert!(h.start(ip("192.0.2.1"), t).is_err());
        // A place given back is a stranger's again.
        h.ended(held.pop().unwrap());
        assert!(h.start(ip("198.51.100.3"), t).is_ok());
        // Known for an hour after last seen, and for as long as a connection
        // from it lasts.
        let later = t + KNOWN_FOR + Duration::from_secs(1);
        let mut h = Handshakes::new(8, t);
        h.seen(ip("192.0.2.1"), t);
        assert!(h.start(ip("192.0.2.1"), t).unwrap().known);
        assert!(!h.start(ip("192.0.2.1"), later).unwrap().known);
        h.connected(ip("192.0.2.2"), t);
        let much_later = later + KNOWN_FOR * 5;
        assert!(h.start(ip("192.0.2.2"), much_later).unwrap().known);
        h.disconnected(ip("192.0.2.2"), much_later);
        assert!(h.start(ip("192.0.2.2"), much_later).unwrap().known);
        assert!(
            !h.start(ip("192.0.2.2"), much_later + KNOWN_FOR)
                .unwrap()
                .known
        );
        // The address, not its /64: a neighbour is a stranger, and cannot
        // take the address's own places.
        let mut h = Handshakes::new(8, t);
        h.seen(ip("2001:db8::1"), t);
        for _ in 0..MAX_PER_SOURCE {
            assert!(!h.start(ip("2001:db8::2"), t).unwrap().known);
        }
        assert!(h.start(ip("2001:db8::3"), t).is_err(), "the /64's share");
        assert!(h.start(ip("2001:db8::1"), t).unwrap().known);
    }

    #[test]
    fn a_stranger_starts_a_handful_of_handshakes_a_minute() {
        let t = Instant::now();
        let mut h = Handshakes::new(64, t);
        for _ in 0..STARTS_PER_MINUTE {
            let p = h.start(ip("198.51.100.1"), t).unwrap();
            h.ended(p);
        }
        assert!(h.start(ip("198.51.100.1"), t).is_err());
        // Another address, and the same one a minute on.
        assert!(h.start(ip("198.51.100.2"), t).is_ok());
        let p = h.start(ip("198.51.100.1"), t + MINUTE).unwrap();
        h.ended(p);
        // A known address is not counted.
        h.seen(ip("192.0.2.1"), t);
        for _ in 0..3 * STARTS_PER_MINUTE {
            let p = h.start(ip("192.0.2.1"), t).unwrap();
            h.ended(p);
        }
    }

    #[test]
    fn what_is_kept_is_bounded() {
        let t = Instant::now();
        let mut h = Handshakes::new(4, t);
        // One address holds a connection; MAX_KNOWN + 10 others are seen.
        h.connected(ip("9.9.9.9"), t);
        for i in 0..MAX_KNOWN as u32 + 10 {
            h.seen(
                IpAddr::from((0x0a00_0000 + i).to_be_bytes()),
                t + Duration::from_millis(i.into()),
            );
        }
        assert_eq!(h.known.len(), MAX_KNOWN);
        // The longest unseen made way, not one holding a connection.
        assert!(h.known.contains_key(&ip("9.9.9.9")));
        assert!(!h.known.contains_key(&ip("10.0.0.10")));
        assert!(h.known.contains_key(&ip("10.0.0.11")));
        assert!(h.known.contains_key(&ip("10.0.32.9")));
        let mut h = Handshakes::new(4, t);
        for i in 0..MAX_COUNTED as u32 {
            let p = h
                .start(IpAddr::from((0x0b00_0000 + i).to_be_bytes()), t)
                .unwrap();
            h.ended(p);
        }
        assert_eq!(
            h.start(ip("198.51.100.1"), t),
            Err("too many addresses started handshakes this minute")
        );
        assert!(h.start(ip("198.51.100.1"), t + MINUTE).is_ok());
        assert_eq!(h.by_source.len(), 1, "only the handshake in progress");
    }
}
