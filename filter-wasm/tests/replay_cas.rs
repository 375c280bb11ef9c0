//! The edge replay copy in shared data: CAS semantics, creation races, corruption.

use gw_core::replay::NonceWindow;
use gw_core::Code;
use gw_filter::replay_cas::{accept_nonce, SharedStore, StoreError, CREATE_CAS};

mod common;
use common::EnvoyLikeStore;

#[test]
fn accepts_once_and_creates_the_key() {
    for strict in [false, true] {
        let s = if strict {
            EnvoyLikeStore::strict()
        } else {
            EnvoyLikeStore::default()
        };
        accept_nonce(&s, "k", 64, 5).unwrap();
        assert_eq!(accept_nonce(&s, "k", 64, 5).unwrap_err().code, Code::Replay);
        accept_nonce(&s, "k", 64, 4).unwrap();
        accept_nonce(&s, "other", 64, 5).unwrap();
    }
}

#[test]
fn creating_never_erases_an_existing_window() {
    let s = EnvoyLikeStore::default();
    accept_nonce(&s, "k", 64, 9).unwrap();
    // A late "create" from another worker must fail, not reset the window.
    assert_eq!(
        s.set("k", &NonceWindow::new(64).unwrap().to_bytes(), CREATE_CAS),
        Err(StoreError::CasMismatch)
    );
    assert_eq!(accept_nonce(&s, "k", 64, 9).unwrap_err().code, Code::Replay);
}

#[test]
fn corrupt_state_fails_closed() {
    let s = EnvoyLikeStore::default();
    s.set("k", b"junk", 0).unwrap();
    assert_eq!(
        accept_nonce(&s, "k", 64, 1).unwrap_err().code,
        Code::ReplayUnavailable
    );
}

#[test]
fn concurrent_duplicates_are_accepted_exactly_once() {
    for round in 0..50u64 {
        let s = std::sync::Arc::new(EnvoyLikeStore::default());
        let oks: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    sc.spawn(move || {
                        usize::from(accept_nonce(&*s, "issuer", 64, 1000 + round).is_ok())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(oks, 1, "round {round}");
    }
}
