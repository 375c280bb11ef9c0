//! Ticket hand-over between the verify and stamp stages.

mod common;
use common::EnvoyLikeStore as MemoryStore;
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

/// Slots are reused once every one was written: on Envoy's store, and on
/// ngx_wasm_module's (Kong's), where a CAS of 0 writes only a missing key — a
/// ticket put there with 0 was refused once its slot had been written before,
/// and every signed command after the first 1 024 of a VM failed.
#[test]
fn slots_are_bounded_and_stale_tickets_miss() {
    for s in [MemoryStore::default(), MemoryStore::strict()] {
        let mut t = Tickets::new(1, "p.");
        let first = t.issue();
        put(&s, &first, &[]).unwrap();
        for _ in 0..SLOTS {
            let x = t.issue();
            put(&s, &x, &[]).unwrap();
        }
        assert_eq!(s.len() as u64, SLOTS);
        assert_eq!(take(&s, "p.", &first.value), Err(TakeError::Missing));
        // A reused slot's ticket is handed over.
        let last = t.issue();
        let h = vec![("x-gw-nonce".to_string(), "9".to_string())];
        put(&s, &last, &h).unwrap();
        assert_eq!(take(&s, "p.", &last.value).unwrap(), h);
    }
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

#[test]
fn local_slots_hand_over_this_vms_tickets_once() {
    let mut local = LocalSlots::default();
    let mut t = Tickets::new(0xfeed, "p.");
    local.register(&t);
    let a = t.issue();
    let h = vec![("x-gw-nonce".to_string(), "9".to_string())];
    assert!(local.put(&a, h.clone()));
    assert_eq!(local.take(&a.value), Some(Ok(h)));
    // Taken: this VM's slots are the only place for this VM's tickets.
    assert_eq!(local.take(&a.value), Some(Err(TakeError::Missing)));
    // Issued but never handed over (the body was refused), or not yet.
    let b = t.issue();
    assert_eq!(local.take(&b.value), Some(Err(TakeError::Missing)));
}

#[test]
fn local_slots_leave_other_vms_tickets_to_shared_data() {
    let mut local = LocalSlots::default();
    let mine = Tickets::new(1, "p.");
    local.register(&mine);
    let mut other = Tickets::new(2, "p.");
    let x = other.issue();
    assert!(!local.put(&x, Vec::new()), "not this VM's issuer");
    assert_eq!(local.take(&x.value), None);
    for bad in [
        "",
        "zz.1.1",
        "0000000000000001.1024.5",
        "0000000000000001.1.x",
    ] {
        assert_eq!(local.take(bad), None, "{bad}");
    }
}

#[test]
fn local_slots_are_bounded_and_a_reused_slot_refuses_the_old_ticket() {
    let mut local = LocalSlots::default();
    let mut t = Tickets::new(3, "p.");
    local.register(&t);
    local.register(&t); // registering twice keeps one ring
    let first = t.issue();
    assert!(local.put(&first, Vec::new()));
    let mut last = None;
    for _ in 0..SLOTS {
        let x = t.issue();
        assert!(local.put(&x, vec![("k".into(), "v".into())]));
        last = Some(x);
    }
    // `first`'s slot now holds the last ticket, which must survive the refusal.
    let last = last.unwrap();
    assert_eq!(key_of("p.", &last.value), key_of("p.", &first.value));
    assert_eq!(local.take(&first.value), Some(Err(TakeError::Missing)));
    assert_eq!(
        local.take(&last.value),
        Some(Ok(vec![("k".into(), "v".into())]))
    );
}

#[test]
fn a_vm_keeps_the_rings_of_its_last_verify_stages_only() {
    let mut local = LocalSlots::default();
    let mut first = Tickets::new(100, "p.");
    local.register(&first);
    let early = first.issue();
    assert!(local.put(&early, Vec::new()));
    // Reconfigured MAX_RINGS times: the first stage's ring goes; its tickets are
    // then looked up in shared data (where the verify stage also wrote them).
    for i in 0..MAX_RINGS as u64 {
        local.register(&Tickets::new(200 + i, "p."));
    }
    assert_eq!(local.take(&early.value), None);
    assert!(!local.put(&first.issue(), Vec::new()));
    let mut last = Tickets::new(200 + MAX_RINGS as u64 - 1, "p.");
    let t = last.issue();
    assert!(local.put(&t, Vec::new()));
    assert_eq!(local.take(&t.value), Some(Ok(Vec::new())));
}

/// An issuer whose ring was dropped (more issuers in the VM than it keeps rings)
/// and that is registered again gets a new ring for its later tickets only: its
/// earlier ones are looked up in shared data, where the verify stage also put
/// them, not reported missing from the new, empty ring.
#[test]
fn a_ring_made_again_holds_only_the_tickets_issued_after_it() {
    let mut local = LocalSlots::default();
    let mut t = Tickets::new(7, "p.");
    local.register(&t);
    let before = t.issue();
    assert!(local.put(&before, Vec::new()));
    for vm in 100..100 + gw_filter::stamp::MAX_RINGS as u64 {
        local.register(&Tickets::new(vm, "q."));
    }
    assert_eq!(local.take(&before.value), None, "its ring was dropped");
    local.register(&t);
    assert_eq!(
        local.take(&before.value),
        None,
        "issued before the new ring"
    );
    let after = t.issue();
    let h = vec![("x-gw-nonce".to_string(), "1".to_string())];
    assert!(local.put(&after, h.clone()));
    assert_eq!(local.take(&after.value), Some(Ok(h)));
}
