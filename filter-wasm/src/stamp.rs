//! Handing verified headers from the body phase to the upstream, within ABI 0.2.1.
//!
//! A proxy-wasm filter can change request headers only in its header phase, but a
//! signed command is known only after its body. So the filter runs twice in the
//! chain: the *verify* stage (before a buffer filter) gives the request a ticket
//! header in its header phase and, once the body verifies, stores the headers to add
//! under that ticket in shared data; the *stamp* stage (after the buffer filter, so
//! it sees the headers only once the body is complete) swaps the ticket for those
//! headers. Slots are a fixed ring per VM, so shared data stays bounded.
//!
//! Where both stages run in one VM (Envoy, when the two filter entries share a
//! `vm_id`, as `envoy/` configures them), the stamp stage finds the headers in
//! [`LocalSlots`], the VM's own memory, and never calls shared data: on a
//! proxy-wasm host each shared-data call is a host crossing plus a call back into
//! the VM for the returned buffer, and in Envoy a lock. Shared data stays the
//! hand-over for a stamp stage in another VM.

use crate::header_map;
use crate::replay_cas::{SharedStore, StoreError};

/// The ticket header (reserved: stripped from client requests by the verify stage).
pub use gw_core::contract::headers::TICKET as TICKET_HEADER;
/// Slots per VM.
pub const SLOTS: u64 = 1024;

/// Issues tickets for one VM.
#[derive(Debug)]
pub struct Tickets {
    vm_id: u64,
    seq: u64,
    prefix: String,
}

/// A ticket: the header value and the shared-data key it points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Header value.
    pub value: String,
    /// Shared-data key of its slot.
    pub key: String,
}

impl Tickets {
    /// Tickets for a VM identified by `vm_id` (random per VM), keys under `prefix`.
    pub fn new(vm_id: u64, prefix: &str) -> Tickets {
        Tickets {
            vm_id,
            seq: 0,
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix of its shared-data keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The VM id this issuer's tickets carry, as in the ticket (16 hex digits).
    pub fn vm(&self) -> String {
        format!("{:016x}", self.vm_id)
    }

    /// The next ticket.
    pub fn issue(&mut self) -> Ticket {
        self.seq = self.seq.wrapping_add(1);
        let slot = self.seq % SLOTS;
        Ticket {
            value: format!("{:016x}.{slot}.{}", self.vm_id, self.seq),
            key: format!("{}{:016x}.{slot}", self.prefix, self.vm_id),
        }
    }
}

/// A ticket's VM id (16 hex digits), slot and number, or `None` if it is not a
/// ticket.
fn parse(ticket: &str) -> Option<(&str, u64, u64)> {
    let mut parts = ticket.split('.');
    let (vm, slot, seq) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || vm.len() != 16 || !vm.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let slot: u64 = slot.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    (slot < SLOTS).then_some((vm, slot, seq))
}

/// The slot key a ticket value points at, or `None` if it is not a ticket.
pub fn key_of(prefix: &str, ticket: &str) -> Option<String> {
    let (vm, slot, _) = parse(ticket)?;
    Some(format!("{prefix}{vm}.{slot}"))
}

/// One VM's own slots: verified headers by ticket, for a stamp stage in the same VM.
type Ring = Vec<Option<(String, Vec<(String, String)>)>>;

/// Rings one VM keeps, one per ticket issuer (per shared-data prefix: a verify
/// stage configured again with the same prefix goes on with its issuer,
/// `host::vm_tickets`); past it the oldest ring goes, and its tickets still in
/// flight are found in shared data.
pub const MAX_RINGS: usize = 4;

/// The hand-over inside one VM: a ring of [`SLOTS`] per ticket issuer of this VM
/// (the last [`MAX_RINGS`]), by the VM id its tickets carry, for the tickets it
/// issued after the ring was made (an issuer whose ring was dropped and is
/// registered again gets a new ring; its earlier tickets are in shared data).
/// For those tickets it is the only place the stamp stage looks: a miss means
/// taken or overwritten, as in shared data.
#[derive(Debug, Default)]
pub struct LocalSlots {
    /// VM id, the last ticket number issued before the ring was made, the ring.
    rings: Vec<(String, u64, Ring)>,
}

impl LocalSlots {
    /// Claims the tickets of `tickets` from now on for this VM.
    pub fn register(&mut self, tickets: &Tickets) {
        let vm = tickets.vm();
        if !self.rings.iter().any(|(v, _, _)| *v == vm) {
            if self.rings.len() >= MAX_RINGS {
                self.rings.remove(0);
            }
            self.rings
                .push((vm, tickets.seq, vec![None; SLOTS as usize]));
        }
    }

    /// The ring that holds the ticket numbered `seq` of `vm`, if one here does.
    fn ring(&mut self, vm: &str, seq: u64) -> Option<&mut Ring> {
        self.rings
            .iter_mut()
            .find(|(v, since, _)| v == vm && seq > *since)
            .map(|(_, _, r)| r)
    }

    /// Keeps the headers for `ticket` (verify stage); `false` if its issuer's ring is
    /// not (or no longer) kept here, so only shared data has them.
    pub fn put(&mut self, ticket: &Ticket, headers: Vec<(String, String)>) -> bool {
        let Some((vm, slot, seq)) = parse(&ticket.value) else {
            return false;
        };
        let value = ticket.value.clone();
        match self.ring(vm, seq).and_then(|r| r.get_mut(slot as usize)) {
            Some(s) => {
                *s = Some((value, headers));
                true
            }
            None => false,
        }
    }

    /// Takes the headers for `ticket` (stamp stage): `None` if it was issued in
    /// another VM, or before its issuer's ring here was made (look in shared
    /// data), else the headers once, then `Missing`.
    pub fn take(&mut self, ticket: &str) -> Option<Result<Vec<(String, String)>, TakeError>> {
        let (vm, slot, seq) = parse(ticket)?;
        let s = self.ring(vm, seq)?.get_mut(slot as usize)?;
        Some(match s.take() {
            Some((t, h)) if t == ticket => Ok(h),
            other => {
                *s = other;
                Err(TakeError::Missing)
            }
        })
    }
}

/// Stores the headers for `ticket` (verify stage, after the body verified).
pub fn put(
    store: &impl SharedStore,
    ticket: &Ticket,
    headers: &[(String, String)],
) -> Result<(), StoreError> {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut value = ticket.value.as_bytes().to_vec();
    value.push(b'\n');
    value.extend_from_slice(&header_map::serialize(&pairs));
    // Written over whatever the slot holds, with its CAS: a CAS of 0 overwrites
    // on Envoy, but creates only a missing key on ngx_wasm_module (Kong), where
    // every slot written before would refuse it. The slot changes under us only
    // when the stamp stage clears an older ticket there.
    for _ in 0..4 {
        let (_, cas) = store.get(&ticket.key)?;
        let done = store.set(&ticket.key, &value, cas);
        if done != Err(StoreError::CasMismatch) {
            return done;
        }
    }
    Err(StoreError::CasMismatch)
}

/// Why the stamp stage could not find the headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeError {
    /// Not a ticket this gateway issued.
    BadTicket,
    /// The slot holds another ticket (overwritten, or never written).
    Missing,
    /// Shared data failed.
    Store(StoreError),
}

/// Takes the headers stored for `ticket` (stamp stage) and clears the slot.
pub fn take(
    store: &impl SharedStore,
    prefix: &str,
    ticket: &str,
) -> Result<Vec<(String, String)>, TakeError> {
    let key = key_of(prefix, ticket).ok_or(TakeError::BadTicket)?;
    let (value, cas) = store.get(&key).map_err(TakeError::Store)?;
    let value = value.ok_or(TakeError::Missing)?;
    let (stored, rest) = match value.iter().position(|b| *b == b'\n') {
        Some(i) => (&value[..i], &value[i + 1..]),
        None => return Err(TakeError::Missing),
    };
    if stored != ticket.as_bytes() {
        return Err(TakeError::Missing);
    }
    let headers = header_map::parse(rest).ok_or(TakeError::Missing)?;
    // Clear the slot so a ticket works once; losing this race only means the slot
    // was reused, which `stored != ticket` catches next time.
    let _ = store.set(&key, b"", cas);
    Ok(headers)
}
