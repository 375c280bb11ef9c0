//! `gwctl ledger verify`: walks every hash chain of `control_decisions` as stored in
//! ClickHouse (one per gateway node); a removed, altered or reordered row is
//! reported with its chain and `seq`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use gw_core::checkpoint::{notes, whole_len, ChainWalk, ChainsWalk, Checkpoint};
use gw_core::ledger::LedgerRow;

/// `gwctl ledger verify` arguments.
#[derive(Args)]
pub struct VerifyArgs {
    /// ClickHouse HTTP URL (`https://` for its `https_port`, with `--clickhouse-ca`).
    #[arg(long, default_value = "http://127.0.0.1:8123")]
    clickhouse: String,
    /// PEM CA certificates ClickHouse's certificate chains to (then only these are
    /// trusted); the sidecar's `clickhouse_tls.ca`.
    #[arg(long)]
    clickhouse_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a ClickHouse that requires one (mutual TLS).
    #[arg(long, requires_all = ["clickhouse_ca", "clickhouse_key"])]
    clickhouse_cert: Option<std::path::PathBuf>,
    /// Its PEM private key.
    #[arg(long, requires = "clickhouse_cert")]
    clickhouse_key: Option<std::path::PathBuf>,
    /// Table holding the decisions.
    #[arg(long, default_value = "control_decisions")]
    table: String,
    /// A file of signed checkpoints (a sidecar's `ledger/checkpoints.log`;
    /// repeat it for each node's): each chain is also checked against its newest
    /// checkpoint in the files, which catches a cut or rewritten chain. A chain
    /// that none of them vouches for fails the check (`unanchored`: anyone who
    /// can INSERT can make a chain of valid hashes), unless `--unanchored-ok`.
    #[arg(long, requires = "key")]
    checkpoint: Vec<std::path::PathBuf>,
    /// With `--checkpoint`: list the chains no checkpoint vouches for without
    /// failing (checking one node's file in a cluster).
    #[arg(long, requires = "checkpoint")]
    unanchored_ok: bool,
    /// Pass when the table holds no row at all (a ledger not written to yet).
    /// Without it an empty table fails the check: the wrong database or user,
    /// or a table emptied, would otherwise pass.
    #[arg(long)]
    allow_empty: bool,
    /// The ledger key's public half (64 hex), or `@FILE` holding it. Repeat it
    /// after a key rotation, oldest first: every note must verify with one of the
    /// keys given, and no note with a key older than an earlier note's (a key
    /// retired, perhaps because it leaked, signs nothing after its successor).
    #[arg(long, requires = "checkpoint")]
    key: Vec<String>,
    /// The name checkpoints are signed under.
    #[arg(long, default_value = "gw-ledger")]
    key_name: String,
    /// ClickHouse user (default: ClickHouse's default user).
    #[arg(long, env = "GW_CLICKHOUSE_USER")]
    user: Option<String>,
    /// ClickHouse password (a command line is readable by every local user:
    /// prefer `--password-file`).
    #[arg(long, env = "GW_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// A file holding the ClickHouse password (trailing line break cut), as the
    /// sidecar's `GW_CLICKHOUSE_PASSWORD_FILE`. Giving the password both ways is
    /// refused.
    #[arg(long, env = "GW_CLICKHOUSE_PASSWORD_FILE")]
    password_file: Option<std::path::PathBuf>,
}

impl VerifyArgs {
    /// `password` read from `--password-file` when that is given; both given is
    /// refused (which one was meant cannot be told). Never echoes the password.
    fn read_password_file(&mut self) -> Result<()> {
        let Some(file) = &self.password_file else {
            return Ok(());
        };
        anyhow::ensure!(
            self.password.is_none(),
            "give the ClickHouse password as --password (GW_CLICKHOUSE_PASSWORD) or --password-file (GW_CLICKHOUSE_PASSWORD_FILE), not both"
        );
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        self.password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
        Ok(())
    }
}

/// Every verified checkpoint of each chain in `path`, in the file's order;
/// every whole note must verify with one of `keys` (the keys before and after a
/// rotation, oldest first), none with a key older than a note before it.
fn checkpoints(
    path: &std::path::Path,
    keys: &[String],
    key_name: &str,
) -> Result<std::collections::BTreeMap<String, Vec<Checkpoint>>> {
    let vks = keys
        .iter()
        .map(|key| {
            let hex_key = match key.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {file}"))?
                    .trim()
                    .to_owned(),
                None => key.to_owned(),
            };
            gw_core::jwk::ed25519_from_hex(&hex_key).context("--key")
        })
        .collect::<Result<Vec<_>>>()?;
    anyhow::ensure!(!vks.is_empty(), "--checkpoint needs --key");
    let file = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // A last note cut short (the writer crashed, or its disk failed, mid-append)
    // holds no signature: it is not read, and the sidecar cuts it off.
    let whole = whole_len(&file);
    if whole < file.len() {
        eprintln!(
            "gwctl: {}: ignored {} bytes after the last whole checkpoint (a write cut short; the sidecar cuts them off)",
            path.display(),
            file.len() - whole
        );
    }
    let text = std::str::from_utf8(&file[..whole])
        .with_context(|| format!("{} is not text", path.display()))?;
    let mut all: std::collections::BTreeMap<String, Vec<Checkpoint>> = Default::default();
    // The oldest key a note may still be signed with.
    let mut current = 0;
    for note in notes(text) {
        let mut opened = Err(anyhow::anyhow!("no key"));
        for (i, vk) in vks.iter().enumerate() {
            opened = Checkpoint::open(&note, key_name, vk)
                .map(|c| (i, c))
                .map_err(anyhow::Error::from);
            if opened.is_ok() {
                break;
            }
        }
        let (i, cp) = opened.with_context(|| {
            format!(
                "a checkpoint in {} does not verify with {}",
                path.display(),
                if vks.len() == 1 {
                    "the key given"
                } else {
                    "any key given"
                }
            )
        })?;
        anyhow::ensure!(
            i >= current,
            "a checkpoint in {} is signed with --key number {} after one signed with number {} (a retired key signs nothing after its successor)",
            path.display(),
            i + 1,
            current + 1
        );
        current = i;
        let chain = cp
            .chain_id()
            .context("a checkpoint of something other than a ledger chain")?
            .to_owned();
        all.entry(chain).or_default().push(cp);
    }
    Ok(all)
}

/// `url` without a password it may carry (`user:password@`), for messages.
fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Whether `url` is plain `http://` to a host that is not loopback.
fn in_clear(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    gw_core::transport::plain_beyond_loopback(u.scheme(), u.host_str().unwrap_or_default())
}

/// The HTTP client for ClickHouse: with `--clickhouse-ca`, only that CA is
/// trusted, and the client certificate is presented when given.
fn http_client(a: &VerifyArgs) -> Result<reqwest::Client> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
    };
    // A redirect would carry the password header to wherever it points. A
    // ClickHouse (or a proxy) that stops answering fails the check instead of
    // hanging it (a cron job would wait for ever): no byte for a minute.
    // No proxy from the environment (`HTTP_PROXY`…, which reqwest obeys even
    // for loopback): the password goes to the URL given, and the rows come from
    // it.
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(60));
    if a.password.is_some() && in_clear(&a.clickhouse) {
        eprintln!(
            "gwctl: warning: --clickhouse is plain http:// to a host that is not loopback: the password crosses the network in clear (use https:// and --clickhouse-ca)"
        );
    }
    if a.clickhouse_ca.is_some() && !a.clickhouse.to_ascii_lowercase().starts_with("https://") {
        anyhow::bail!(
            "--clickhouse-ca is for an https:// --clickhouse URL (over http:// the password travels in plain text)"
        );
    }
    if let Some(ca) = &a.clickhouse_ca {
        b = b.tls_built_in_root_certs(false);
        for c in reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .with_context(|| format!("{}: not PEM certificates", ca.display()))?
        {
            b = b.add_root_certificate(c);
        }
    }
    if let (Some(cert), Some(key)) = (&a.clickhouse_cert, &a.clickhouse_key) {
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        let id = reqwest::Identity::from_pem(&pem).with_context(|| {
            format!(
                "{} and {}: not a PEM certificate and private key",
                cert.display(),
                key.display()
            )
        })?;
        b = b.identity(id);
    }
    b.build().context("cannot set up the HTTP client")
}

/// Longest line of ClickHouse's answer read as one row (a stored row is a few
/// KiB: its body is cut at 4 KiB).
const MAX_ROW_BYTES: usize = 4 << 20;

/// The walk of every chain as ClickHouse streams its rows, and what was found
/// in the chains walked to their end.
struct Walking {
    walk: ChainsWalk,
    report: Report,
}

impl Walking {
    fn push(&mut self, r: &LedgerRow) -> Result<()> {
        if let Some(ended) = self.walk.push(r)? {
            self.report.chain(&ended);
        }
        Ok(())
    }
}

/// What the verification found, told as each chain ends: nothing of a chain is
/// kept once it is told (a store of a million chains is verified in constant
/// memory).
#[derive(Default)]
struct Report {
    /// Checkpoint files were given: a chain none vouches for is unanchored.
    anchoring: bool,
    /// Unanchored chains are listed, not failed.
    unanchored_ok: bool,
    /// The first chain's lines, held back until a second chain with rows shows
    /// whether its `ok` line is told (one chain: only the total is).
    held: Option<Vec<(bool, String)>>,
    /// Chains with rows told so far.
    with_rows: usize,
    /// Rows read, and rows walked (a row stored twice counts once).
    stored: u64,
    total: u64,
    broken: bool,
}

impl Report {
    /// `line`; `ok_line`: a chain's `ok` line, told only when there are two or
    /// more chains.
    fn say(&mut self, ok_line: bool, line: String) {
        match &mut self.held {
            Some(lines) if self.with_rows <= 1 => lines.push((ok_line, line)),
            _ => println!("{line}"),
        }
    }

    fn chain(&mut self, w: &ChainWalk) {
        let chain = &w.chain_id;
        self.stored += w.read;
        if w.read > 0 {
            self.with_rows += 1;
            match self.with_rows {
                1 => self.held = Some(Vec::new()),
                2 => {
                    for (_, line) in self.held.take().unwrap_or_default() {
                        println!("{line}");
                    }
                }
                _ => {}
            }
        }
        // Every break, not only the first: the walk went on after each.
        if w.breaks.is_empty() {
            let n = w.walked();
            self.total += n;
            if w.read > 0 {
                self.say(true, format!("chain {chain}: ok {n} rows"));
            }
        } else {
            self.broken = true;
            for e in &w.breaks.listed {
                self.say(false, format!("broken: chain {chain}: {e}"));
            }
            if w.breaks.more > 0 {
                let more = w.breaks.more;
                self.say(
                    false,
                    format!("broken: chain {chain}: … and {more} more breaks"),
                );
            }
        }
        // Held to its checkpoint whatever else is broken; a chain with no row at
        // all holds nothing.
        match (w.checkpoint_size(), w.held()) {
            (Some(size), Some(Ok(_))) => {
                self.say(
                    false,
                    format!("chain {chain}: matches its checkpoint of {size} rows"),
                );
            }
            (Some(_), Some(Err(e))) => {
                self.broken = true;
                self.say(false, format!("broken: chain {chain}: {e}"));
            }
            (None, _) if self.anchoring && w.read > 0 => {
                // Valid hashes prove nothing of who wrote them: only a signed
                // checkpoint does.
                let line = format!(
                    "unanchored: chain {chain}: {} rows, no checkpoint in the files given",
                    w.read
                );
                self.say(false, line);
                self.broken |= !self.unanchored_ok;
            }
            _ => {}
        }
    }

    /// The end: the lines still held (one chain: not its `ok` line).
    fn finish(&mut self) {
        for (ok_line, line) in self.held.take().unwrap_or_default() {
            if !ok_line {
                println!("{line}");
            }
        }
    }
}

/// Sends `sql` to ClickHouse: its answer, once it said 200.
async fn clickhouse_query(
    client: &reqwest::Client,
    a: &VerifyArgs,
    sql: String,
) -> Result<reqwest::Response> {
    let mut req = client.post(&a.clickhouse).body(sql);
    if let Some(u) = &a.user {
        req = req.header("x-clickhouse-user", u);
    }
    if let Some(p) = &a.password {
        req = req.header("x-clickhouse-key", p);
    }
    // reqwest's message names the URL, password and all.
    let resp = req
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| {
            format!(
                "cannot reach ClickHouse at {}",
                without_password(&a.clickhouse)
            )
        })?;
    let status = resp.status();
    if !status.is_success() {
        let text = small_text(resp, true).await?;
        anyhow::bail!(
            "ClickHouse answered {status}: {}",
            crate::send::printable(text.trim()).replace('\n', " ")
        );
    }
    Ok(resp)
}

/// Most bytes of a short ClickHouse answer read (an error, the table's
/// columns, a count): a wrong URL or a hostile endpoint does not fill memory.
const SHORT_ANSWER_BYTES: usize = 64 << 10;

/// The text of a short ClickHouse answer `resp`: cut at [`SHORT_ANSWER_BYTES`]
/// (`cut`, an error's text), or refused beyond it.
async fn small_text(mut resp: reqwest::Response, cut: bool) -> Result<String> {
    let mut body = Vec::new();
    while let Some(chunk) = next_chunk(&mut resp).await? {
        body.extend_from_slice(&chunk);
        if body.len() > SHORT_ANSWER_BYTES {
            anyhow::ensure!(
                cut,
                "ClickHouse's answer is longer than {SHORT_ANSWER_BYTES} bytes (is --clickhouse a ClickHouse?)"
            );
            body.truncate(SHORT_ANSWER_BYTES);
            break;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The next chunk of ClickHouse's answer `resp` (its error without the URL,
/// which may carry credentials).
async fn next_chunk(resp: &mut reqwest::Response) -> Result<Option<bytes::Bytes>> {
    resp.chunk()
        .await
        .map_err(reqwest::Error::without_url)
        .context("ClickHouse answer")
}

/// Reads ClickHouse's answer `resp` line by line into `walking`.
async fn stream_rows(mut resp: reqwest::Response, walking: &mut Walking) -> Result<()> {
    let mut pending: Vec<u8> = Vec::new();
    let mut line_no = 0usize;
    let mut row = |line: &[u8], walking: &mut Walking| -> Result<()> {
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let r: LedgerRow = serde_json::from_slice(line)
            .with_context(|| format!("row {line_no} is not a ledger row"))?;
        walking.push(&r)
    };
    while let Some(chunk) = next_chunk(&mut resp).await? {
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(n) = pending[start..].iter().position(|b| *b == b'\n') {
            row(&pending[start..start + n], walking)?;
            start += n + 1;
        }
        pending.drain(..start);
        anyhow::ensure!(
            pending.len() <= MAX_ROW_BYTES,
            "row {} is over {MAX_ROW_BYTES} bytes: not a ledger row",
            line_no + 1
        );
    }
    row(&pending, walking)
}

/// `gwctl ledger verify`: the rows are read as they come, one chain at a time
/// (memory does not grow with the table's size; the checkpoint files given are
/// held whole, a few dozen bytes per checkpoint).
pub fn verify(mut a: VerifyArgs) -> Result<ExitCode> {
    a.read_password_file()?;
    let a = &a;
    if !a
        .table
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        anyhow::bail!("--table `{}` is not a plain table name", a.table);
    }
    // Before the query: a checkpoint file that cannot be read stops it first.
    let mut report = Report {
        anchoring: !a.checkpoint.is_empty(),
        unanchored_ok: a.unanchored_ok,
        ..Report::default()
    };
    // Every checkpoint of each chain, by size: the walk holds the chain to each
    // (a row rewritten under an older one, the chain rebuilt on top and the
    // newest signed over it, breaks the walk there).
    let mut anchors: BTreeMap<String, BTreeMap<u64, Checkpoint>> = BTreeMap::new();
    for path in &a.checkpoint {
        let held = checkpoints(path, &a.key, &a.key_name)?;
        if held.is_empty() {
            // A file given to vouch that vouches for nothing (emptied, cut,
            // another file): the check it was given for would not happen.
            println!("broken: {} holds no checkpoint yet", path.display());
            report.broken = true;
        }
        for (chain, cps) in held {
            let by_size = anchors.entry(chain.clone()).or_default();
            for cp in cps {
                match by_size.get(&cp.size) {
                    Some(had) if had.head != cp.head => {
                        // The ledger key signed two histories of one chain.
                        println!(
                            "broken: chain {chain}: two checkpoints of {} rows disagree (two different heads, both signed)",
                            cp.size
                        );
                        report.broken = true;
                    }
                    Some(_) => {}
                    None => {
                        by_size.insert(cp.size, cp);
                    }
                }
            }
        }
    }
    let anchors: BTreeMap<String, Vec<Checkpoint>> = anchors
        .into_iter()
        .map(|(chain, by_size)| (chain, by_size.into_values().collect()))
        .collect();
    let not_walked = format!(
        "{} SETTINGS output_format_json_quote_64bit_integers = 0 FORMAT JSONEachRow",
        gw_core::ledger::not_walked_sql(&a.table)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = http_client(a)?;
    let mut walking = Walking {
        walk: ChainsWalk::with_all(anchors),
        report,
    };
    let foreign = rt.block_on(async {
        // The table's columns: one made before a column was added (kept as it
        // was, an archive) is walked with that column empty.
        let resp = clickhouse_query(
            &client,
            a,
            format!("DESCRIBE TABLE {} FORMAT JSONEachRow", a.table),
        )
        .await?;
        let text = small_text(resp, false).await?;
        let stored: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        let stored: Vec<&str> = stored.iter().map(String::as_str).collect();
        let lacking: Vec<&str> = gw_core::ledger::COLUMNS
            .iter()
            .copied()
            .filter(|c| !stored.contains(c) && !gw_core::ledger::OPTIONAL_COLUMNS.contains(c))
            .collect();
        anyhow::ensure!(
            lacking.is_empty(),
            "`{}` is not a ledger table: it has no column {}",
            a.table,
            lacking.join(", ")
        );
        let sql = format!(
            // 64-bit integers as JSON numbers: a ClickHouse before 25.8 quotes them.
            // (The walk's query throws at a profile's limits, and reads text that
            // is not UTF-8 replaced, its row a break: gw_core::ledger::walk_sql.)
            "{}, output_format_json_quote_64bit_integers = 0 FORMAT JSONEachRow",
            gw_core::ledger::walk_sql_of(&a.table, &stored)
        );
        let resp = clickhouse_query(&client, a, not_walked).await?;
        let text = small_text(resp, false).await?;
        let counts: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("ClickHouse's count is not JSON: {}", text.trim()))?;
        let count = |k: &str| {
            counts[k]
                .as_u64()
                .context("ClickHouse's count is not a number")
        };
        let foreign = (count("rows")?, count("chains")?);
        stream_rows(clickhouse_query(&client, a, sql).await?, &mut walking).await?;
        anyhow::Ok(foreign)
    })?;
    let Walking { walk, mut report } = walking;
    // The chain walked last, then the chains with a checkpoint and no row.
    for w in walk.finish() {
        report.chain(&w);
    }
    report.finish();
    let Report {
        stored,
        total,
        broken,
        ..
    } = report;
    if foreign.0 > 0 {
        println!(
            "broken: {} rows under {} chain ids that are not UTF-8 (no gateway writes one; not walked)",
            foreign.0, foreign.1
        );
    }
    if broken || foreign.0 > 0 {
        return Ok(ExitCode::from(1));
    }
    if stored == 0 && !a.allow_empty {
        println!(
            "broken: `{}` holds no ledger row (the wrong database or user, or a table emptied; --allow-empty for a ledger not written to yet)",
            a.table
        );
        return Ok(ExitCode::from(1));
    }
    if stored > total {
        println!(
            "({} of the stored rows are copies of others, counted once)",
            stored - total
        );
    }
    println!("ok {total} rows");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{checkpoints, without_password};

    #[test]
    fn a_password_in_the_url_is_not_echoed() {
        assert_eq!(
            without_password("https://gw_admin:s3cret@ch.internal:8443/"),
            "https://gw_admin:***@ch.internal:8443/"
        );
        assert_eq!(
            without_password("http://127.0.0.1:8123"),
            "http://127.0.0.1:8123"
        );
    }
    use gw_core::checkpoint::Checkpoint;

    /// After a key rotation the file holds notes of both keys: it verifies when
    /// both are given, and not with either alone (a note no key given verifies is
    /// never skipped).
    #[test]
    fn a_rotated_key_verifies_with_both_keys_given() {
        let d = testkit::TempDir::new("gwctl-rotation");
        let (old, new) = (
            ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
            ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
        );
        let path = d.path().join("checkpoints.log");
        let notes = [
            Checkpoint::for_chain("node-1", 5, [5; 32]).sign("gw-ledger", &old),
            Checkpoint::for_chain("node-1", 9, [9; 32]).sign("gw-ledger", &new),
        ]
        .concat();
        std::fs::write(&path, notes).unwrap();
        let hex = |k: &ed25519_dalek::SigningKey| hex::encode(k.verifying_key().as_bytes());
        let both = checkpoints(&path, &[hex(&old), hex(&new)], "gw-ledger").unwrap();
        let sizes: Vec<u64> = both["node-1"].iter().map(|c| c.size).collect();
        assert_eq!(sizes, [5, 9], "every checkpoint, in the file's order");
        for one in [hex(&old), hex(&new)] {
            let e = checkpoints(&path, &[one], "gw-ledger").unwrap_err();
            assert!(format!("{e:#}").contains("does not verify"), "{e:#}");
        }
        // The keys in the wrong order; then a note of the retired key after its
        // successor's (say, appended by whoever took the old key).
        let e = checkpoints(&path, &[hex(&new), hex(&old)], "gw-ledger").unwrap_err();
        assert!(format!("{e:#}").contains("retired key"), "{e:#}");
        let mut more = std::fs::read_to_string(&path).unwrap();
        more.push_str(&Checkpoint::for_chain("node-1", 99, [7; 32]).sign("gw-ledger", &old));
        std::fs::write(&path, more).unwrap();
        let e = checkpoints(&path, &[hex(&old), hex(&new)], "gw-ledger").unwrap_err();
        assert!(format!("{e:#}").contains("retired key"), "{e:#}");
    }
}
