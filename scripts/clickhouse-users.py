#!/usr/bin/env python3
"""Writes the ClickHouse users of a gateway, for the local run and for compose alike:

- `gw_admin`, the administrator (creates tables: `gw-sidecar --setup-clickhouse`;
  operators' queries; `gwctl ledger verify`), with the password in
  --admin-password-file;
- `default`, left without a password because the embedded engine of the local run
  logs in as it (from 127.0.0.1) to start its listeners: reachable from loopback
  only and granted nothing but `SYSTEM LISTEN` — which covers stopping them too, so
  in the local run any local user can stop ClickHouse's listeners (docs/configuration.md);
- `gw_sidecar`, what the sidecar writes as, with the password in
  --sidecar-password-file and only `SELECT, INSERT` on the sidecar's tables (the
  list `TABLES` in sidecar/src/ledger/migrations.rs): it cannot drop, truncate,
  alter or delete the ledger, nor read or write anything else.

Passwords are stored as SHA-256 hashes. Two shapes:

  clickhouse-users.py ... --standalone -o users.xml   a whole users file (the local run)
  clickhouse-users.py ... --users-d -o gw.xml         a users.d/ drop-in over the
                                                      server image's users.xml (compose)
"""
import argparse
import hashlib
import os
import re
import sys
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDECAR_USER = "gw_sidecar"
ADMIN_USER = "gw_admin"


def sidecar_tables():
    src = open(os.path.join(ROOT, "sidecar/src/ledger/migrations.rs")).read()
    m = re.search(r"pub const TABLES: \[&str; \d+\] = \[([^\]]*)\]", src)
    if not m:
        sys.exit("clickhouse-users.py: TABLES not found in sidecar/src/ledger/migrations.rs")
    return re.findall(r'"([a-z_0-9]+)"', m.group(1))


def password_hash(path):
    with open(path) as f:
        pw = f.read().rstrip("\r\n")
    if len(pw) < 16:
        sys.exit(f"clickhouse-users.py: the password in {path} is shorter than 16 characters")
    return hashlib.sha256(pw.encode()).hexdigest()


def render(admin_hash, sidecar_hash, tables, users_d, database="default"):
    # users.d merges into the server image's users.xml: its `default` user's
    # networks are replaced, not added to.
    replace = ' replace="replace"' if users_d else ""
    grants = "".join(
        f"<query>GRANT SELECT, INSERT ON {escape(database)}.{escape(t)}</query>" for t in tables
    )
    head = "" if users_d else "  <profiles><default/></profiles>\n  <quotas><default/></quotas>\n"
    return f"""<clickhouse>
  <!-- Written by scripts/clickhouse-users.py: the administrator {ADMIN_USER}, the
       sidecar's least-privilege user {SIDECAR_USER} (SELECT, INSERT on
       {', '.join(tables)}), and a default user that can do nothing but start (and stop) listeners. -->
{head}  <users>
    <default{replace}>
      <no_password/>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <grants><query>GRANT SYSTEM LISTEN ON *.*</query></grants>
    </default>
    <{ADMIN_USER}>
      <password_sha256_hex>{admin_hash}</password_sha256_hex>
      <networks><ip>::/0</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <access_management>1</access_management>
    </{ADMIN_USER}>
    <{SIDECAR_USER}>
      <password_sha256_hex>{sidecar_hash}</password_sha256_hex>
      <networks><ip>::/0</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <grants>{grants}</grants>
    </{SIDECAR_USER}>
  </users>
</clickhouse>
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--admin-password-file", required=True)
    ap.add_argument("--sidecar-password-file", required=True)
    shape = ap.add_mutually_exclusive_group(required=True)
    shape.add_argument("--standalone", action="store_true")
    shape.add_argument("--users-d", action="store_true")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    xml = render(
        password_hash(a.admin_password_file),
        password_hash(a.sidecar_password_file),
        sidecar_tables(),
        a.users_d,
    )
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(xml)
    os.chmod(tmp, 0o644)  # hashes only; the server's user must read it
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
