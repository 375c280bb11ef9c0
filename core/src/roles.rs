//! Role checks. Roles form a fixed ladder — `admin` ⊇ `operator` ⊇ `viewer` — so a
//! route that needs `viewer` accepts an `admin`. Other role names match only exactly.

/// The ordered built-in roles, weakest first.
pub const LADDER: [&str; 3] = ["viewer", "operator", "admin"];

fn rank(role: &str) -> Option<usize> {
    LADDER.iter().position(|r| *r == role)
}

/// Whether a caller holding `have` satisfies a route that needs `need`.
pub fn satisfies<S: AsRef<str>>(have: &[S], need: &str) -> bool {
    match rank(need) {
        Some(n) => have
            .iter()
            .any(|h| rank(h.as_ref()).is_some_and(|r| r >= n)),
        None => have.iter().any(|h| h.as_ref() == need),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder() {
        assert!(satisfies(&["admin"], "viewer"));
        assert!(satisfies(&["operator"], "viewer"));
        assert!(!satisfies(&["viewer"], "admin"));
        assert!(!satisfies::<&str>(&[], "viewer"));
        assert!(satisfies(&["x", "auditor"], "auditor"));
        assert!(!satisfies(&["admin"], "auditor"));
        assert!(!satisfies(&["Admin"], "admin"), "names are case-sensitive");
    }
}
