//! Ticket hand-over between the verify and stamp stages.

use gw_filter::replay_cas::MemoryStore;
use gw_filter::stamp::*;

#[test]
fn ticket_round_trip_once() {
    let s = MemoryStore::default();
    let mut t = Tickets::new(0xabcdef, "gw.stamp.");
    let a = t.issue();
    let h = vec![("x-gw-nonce".to_string(), "7".to_string())];
    put(&s, &a, &h).unwrap();
    assert_eq!(take(&s, "gw.stamp.", &a.value).unwrap(), h);
    assert_eq!(take(&s, "gw.stamp.", &a.value), Err(TakeError::Missing));
}

#[test]
fn slots_are_bounded_and_stale_tickets_miss() {
    let s = MemoryStore::default();
    let mut t = Tickets::new(1, "p.");
    let first = t.issue();
    put(&s, &first, &[]).unwrap();
    for _ in 0..SLOTS {
        let x = t.issue();
        put(&s, &x, &[]).unwrap();
    }
    assert_eq!(s.len() as u64, SLOTS);
    assert_eq!(take(&s, "p.", &first.value), Err(TakeError::Missing));
}

#[test]
fn forged_tickets_are_refused() {
    let s = MemoryStore::default();
    for bad in [
        "",
        "x",
        "zz.1.1",
        "0000000000000001.1024.5",
        "0000000000000001.1.x",
        "0000000000000001.1.1.1",
    ] {
        assert_eq!(take(&s, "p.", bad), Err(TakeError::BadTicket), "{bad}");
    }
    assert_eq!(
        take(&s, "p.", "0000000000000001.3.3"),
        Err(TakeError::Missing)
    );
}
