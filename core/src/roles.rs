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

/// Whether `role` can be a role a route or the command endpoints need: one
/// name, as a token's roles hold them (no comma, space or control character:
/// the edge refuses a token role holding one), at most 64 bytes.
pub fn valid_role_name(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= 64
        && !role
            .chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control())
}

/// An access rule: requests whose path starts with `prefix` need `role` (with the
/// role ladder), or nothing when `public`. The filter's `routes` and the
/// sidecar's share it, and [`RouteTable`]'s checks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Path prefix.
    pub prefix: String,
    /// Role needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// No authentication at all (dashboard assets).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
}

impl RouteRule {
    /// A rule needing `role` under `prefix`.
    pub fn needs(prefix: &str, role: &str) -> RouteRule {
        RouteRule {
            prefix: prefix.to_owned(),
            role: Some(role.to_owned()),
            public: false,
        }
    }
}

/// Access rules, checked: each prefix starts with '/', appears once, and has
/// either a role or `public`; the longest matching prefix wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTable {
    /// Longest prefix first.
    rules: Vec<RouteRule>,
}

impl RouteTable {
    /// Checks `rules` (the error names the rule at fault).
    pub fn new(rules: Vec<RouteRule>) -> Result<RouteTable, String> {
        if rules.is_empty() {
            return Err("routes is empty: every request would be refused".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &rules {
            if !r.prefix.starts_with('/') {
                return Err(format!("route prefix `{}` must start with '/'", r.prefix));
            }
            match (&r.role, r.public) {
                (Some(_), true) => {
                    return Err(format!(
                        "route `{}`: role and public exclude each other",
                        r.prefix
                    ))
                }
                (None, false) => {
                    return Err(format!("route `{}`: give a role or public: true", r.prefix))
                }
                (Some(role), false) if role.trim().is_empty() || role.contains(',') => {
                    return Err(format!(
                        "route `{}`: the role must be one role name",
                        r.prefix
                    ))
                }
                _ => {}
            }
            if !seen.insert(&r.prefix) {
                return Err(format!("route prefix `{}` appears twice", r.prefix));
            }
        }
        let mut rules = rules;
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(RouteTable { rules })
    }

    /// The rule for `path` (longest prefix), if any.
    pub fn rule_for(&self, path: &str) -> Option<&RouteRule> {
        self.rules.iter().find(|r| path.starts_with(&r.prefix))
    }

    /// The rules, longest prefix first.
    pub fn rules(&self) -> &[RouteRule] {
        &self.rules
    }

    /// How many rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Never true for a table [`Self::new`] made.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The shipped access rules (`filter-wasm/config.example.json`): the ledger's
/// queries and the realtime stream for `viewer`, every other API for `operator`,
/// the rest (the console's assets) public.
pub fn default_routes() -> Vec<RouteRule> {
    vec![
        RouteRule::needs("/api/ledger/", "viewer"),
        RouteRule::needs("/api/realtime", "viewer"),
        RouteRule::needs("/api/", "operator"),
        RouteRule {
            prefix: "/".into(),
            role: None,
            public: true,
        },
    ]
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_role_is_one_name() {
        assert!(super::valid_role_name("admin") && super::valid_role_name("risk-desk"));
        for bad in ["", "admin,viewer", "ad min", "a\u{7}", &"x".repeat(65)] {
            assert!(!super::valid_role_name(bad), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn route_tables_are_checked_and_match_the_longest_prefix() {
        let t = RouteTable::new(default_routes()).unwrap();
        let role = |p: &str| t.rule_for(p).and_then(|r| r.role.clone());
        assert_eq!(role("/api/ledger/verify").as_deref(), Some("viewer"));
        assert_eq!(role("/api/rpc").as_deref(), Some("operator"));
        assert_eq!(
            role("/api/ledger").as_deref(),
            Some("operator"),
            "no trailing slash"
        );
        assert!(t.rule_for("/index.html").is_some_and(|r| r.public));
        let bad = |rules: serde_json::Value, says: &str| {
            let rules: Vec<RouteRule> = serde_json::from_value(rules).unwrap();
            let e = RouteTable::new(rules).unwrap_err();
            assert!(e.contains(says), "{e}");
        };
        bad(serde_json::json!([]), "empty");
        bad(serde_json::json!([{"prefix": "api/"}]), "start with '/'");
        bad(serde_json::json!([{"prefix": "/a"}]), "give a role");
        bad(
            serde_json::json!([{"prefix": "/a", "role": "x", "public": true}]),
            "exclude",
        );
        bad(
            serde_json::json!([{"prefix": "/a", "role": "viewer,admin"}]),
            "one role",
        );
        bad(
            serde_json::json!([{"prefix": "/a", "role": " "}]),
            "one role",
        );
        bad(
            serde_json::json!([{"prefix": "/a", "role": "x"}, {"prefix": "/a", "public": true}]),
            "twice",
        );
        assert!(serde_json::from_value::<RouteRule>(
            serde_json::json!({"prefix": "/", "roles": "x"})
        )
        .is_err());
    }

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
