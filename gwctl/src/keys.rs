//! Key generation, key files, and development JWTs.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ed25519_dalek::SigningKey;
use gw_core::jwk::ed25519_public_jwk;

/// Writes `contents` to `path`, made whole beside it first: a new file (linked
/// into place, which fails if one is there: a write cut short leaves nothing at
/// `path`), or with `force` a replacement renamed over it (a link at `path` is
/// replaced, not written through; a failure leaves the old file as it was).
/// `secret`: mode 0600 from the start.
pub(crate) fn write_new(path: &Path, contents: &[u8], secret: bool, force: bool) -> Result<()> {
    if !force {
        refuse_existing(path)?;
    }
    Staged::write(path, contents, secret)?.place(force)
}

/// An error when something is at `path` (a file, a link, even a dangling one).
fn refuse_existing(path: &Path) -> Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!("{} exists (use --force to overwrite)", path.display());
    }
    Ok(())
}

/// A file's contents written and synced beside its place, not yet in it;
/// removed when dropped.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

impl Staged {
    /// `contents` in a new file beside `path` (mode 0600 when `secret`).
    fn write(path: &Path, contents: &[u8], secret: bool) -> Result<Staged> {
        let name = path.file_name().context("no file name")?.to_string_lossy();
        let staged = Staged {
            tmp: path.with_file_name(format!(".{name}.{}.tmp", std::process::id())),
            path: path.to_owned(),
        };
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let _ = secret;
        let mut f = opts
            .open(&staged.tmp)
            .with_context(|| format!("cannot write {}", staged.tmp.display()))?;
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", staged.tmp.display()))?;
        Ok(staged)
    }

    /// Into its place: renamed over what is there with `force`, else linked
    /// (never over a file that appeared meanwhile).
    fn place(self, force: bool) -> Result<()> {
        let placed = if force {
            std::fs::rename(&self.tmp, &self.path)
        } else {
            std::fs::hard_link(&self.tmp, &self.path)
        };
        match placed {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("{} exists (use --force to overwrite)", self.path.display())
            }
            Err(e) => Err(e).with_context(|| format!("cannot write {}", self.path.display())),
            Ok(()) => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// `gwctl keygen`: the secret key, the public key and its JWK, written together:
/// none is written when one of them is there already (without `force`) or one
/// cannot be written whole, so a failed run never leaves a secret key without
/// its public halves. With `force` the three are renamed over the old ones one
/// by one (public halves first): a rename that fails part way (an old file that
/// cannot be replaced) says which files were replaced.
pub fn keygen(id: &str, out: &Path, force: bool) -> Result<()> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("key id `{id}` must be non-empty ASCII letters, digits, '-', '_' or '.'");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, seed.as_mut())
        .context("the operating system's random source failed")?;
    let sk = SigningKey::from_bytes(&seed);
    let vk = sk.verifying_key();
    let sk_path = out.join(format!("{id}.sk.hex"));
    let pk_path = out.join(format!("{id}.pk.hex"));
    let jwk_path = out.join(format!("{id}.jwk.json"));
    if !force {
        for p in [&sk_path, &pk_path, &jwk_path] {
            refuse_existing(p)?;
        }
    }
    let sk_hex = zeroize::Zeroizing::new(format!("{}\n", hex::encode(sk.to_bytes())));
    let staged = [
        Staged::write(&sk_path, sk_hex.as_bytes(), true)?,
        Staged::write(
            &pk_path,
            format!("{}\n", hex::encode(vk.as_bytes())).as_bytes(),
            false,
        )?,
        Staged::write(
            &jwk_path,
            format!("{}\n", ed25519_public_jwk(id, &vk)).as_bytes(),
            false,
        )?,
    ];
    // Placed public halves first: a key pair is usable once its secret is in place.
    let [sk_file, pk_file, jwk_file] = staged;
    let mut placed: Vec<PathBuf> = Vec::new();
    for f in [pk_file, jwk_file, sk_file] {
        let path = f.path.clone();
        if let Err(e) = f.place(force) {
            if !force {
                // Linked here by this run: not a key pair.
                for p in &placed {
                    let _ = std::fs::remove_file(p);
                }
            } else if !placed.is_empty() {
                let names: Vec<String> = placed.iter().map(|p| p.display().to_string()).collect();
                return Err(e.context(format!(
                    "{} replaced already: these files are not one key pair now (run keygen --force again)",
                    names.join(", ")
                )));
            }
            return Err(e);
        }
        placed.push(path);
    }
    println!("{}", sk_path.display());
    println!("{}", pk_path.display());
    println!("{}", jwk_path.display());
    Ok(())
}

/// Reads a 32-byte hex secret from a file (whitespace ignored).
pub fn read_hex_secret(path: &Path, what: &str) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    hex::decode(text.trim()).with_context(|| format!("{what} {} is not hex", path.display()))
}

/// Reads an Ed25519 signing key (32 bytes of hex) from a file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let bytes = read_hex_secret(path, "signing key")?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "signing key {} must be 32 bytes of hex, got {}",
            path.display(),
            bytes.len()
        )
    })?;
    Ok(SigningKey::from_bytes(&arr))
}

/// `gwctl jwt` arguments.
#[derive(Args)]
pub struct JwtArgs {
    /// The HMAC secret as hex (at least 32 bytes). Other users of the host see a
    /// process's arguments: prefer --secret-file.
    #[arg(
        long,
        conflicts_with = "secret_file",
        required_unless_present = "secret_file"
    )]
    secret_hex: Option<String>,
    /// A file holding the HMAC secret as hex.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// `sub` claim.
    #[arg(long)]
    sub: String,
    /// Role to grant (repeatable).
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Lifetime: 90s, 30m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// `iss` claim.
    #[arg(long, default_value = "defi-dashboard")]
    iss: String,
    /// `aud` claim.
    #[arg(long, default_value = "defi-users")]
    aud: String,
    /// `kid` header.
    #[arg(long)]
    kid: Option<String>,
    /// Name of the roles claim.
    #[arg(long, default_value = "roles")]
    roles_claim: String,
}

/// `gwctl jwt`.
pub fn jwt(a: &JwtArgs) -> Result<()> {
    let secret = match (&a.secret_hex, &a.secret_file) {
        (Some(h), _) => hex::decode(h.trim()).context("--secret-hex is not hex")?,
        (None, Some(p)) => read_hex_secret(p, "secret")?,
        (None, None) => bail!("give --secret-hex or --secret-file"),
    };
    let ttl = crate::duration::parse_secs(&a.ttl)?;
    let now = now_secs()?;
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), a.sub.clone().into());
    claims.insert("iss".into(), a.iss.clone().into());
    claims.insert("aud".into(), a.aud.clone().into());
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(ttl).into());
    claims.insert(a.roles_claim.clone(), a.roles.clone().into());
    let token = gw_core::jwt::mint_hs256(&secret, a.kid.as_deref(), &claims)?;
    println!("{token}");
    Ok(())
}

/// Unix seconds now.
pub fn now_secs() -> Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs())
}
