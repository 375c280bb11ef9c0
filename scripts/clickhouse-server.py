"""Runs a real ClickHouse engine (26.9, from the PyPI wheel `chdb-core`) as a server
on 127.0.0.1: HTTP on --http-port, native on --tcp-port, data in --data.

The engine is the extension module `chdb/_chdb.abi3.so`, loaded directly (ctypes with
RTLD_DEEPBIND first, so its bundled libraries win, then the import machinery) — not
through `import chdb`, whose import-time engine shutdown breaks the Kafka engine. A
`config.xml` in the working directory enables the listeners; one query starts them
and then blocks forever, keeping the server up until the process is stopped.

Without --users the `default` user has no password (tests); with --users FILE the
users come from FILE (scripts/clickhouse-users.py writes one; a `FILE`.d/ directory
beside it is merged in, as a server merges users.d/).
"""
import argparse
import ctypes
import importlib.machinery
import importlib.util
import os
import sys

CONFIG = """<clickhouse>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http}</http_port>
  <tcp_port>{tcp}</tcp_port>
  <format_schema_path>{schemas}</format_schema_path>
  <logger><level>warning</level><console>1</console></logger>
  <!-- Merges at nice 19 (applied with CAP_SYS_NICE): a ClickHouse sharing the
       gateway's cores yields to it; the ledger's inserts ask for the same. -->
  <os_threads_nice_value_merge_mutate>19</os_threads_nice_value_merge_mutate>
{users}</clickhouse>
"""


def load_engine():
    spec = importlib.util.find_spec("chdb")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("clickhouse-server.py: chdb-core is not installed in this Python")
    path = os.path.join(list(spec.submodule_search_locations)[0], "_chdb.abi3.so")
    ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL | getattr(os, "RTLD_DEEPBIND", 0))
    loader = importlib.machinery.ExtensionFileLoader("_chdb", path)
    mod_spec = importlib.util.spec_from_file_location("_chdb", path, loader=loader)
    mod = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--http-port", type=int, default=8123)
    ap.add_argument("--tcp-port", type=int, default=9000)
    ap.add_argument("--data", required=True, help="data directory (created)")
    ap.add_argument("--schemas", help="format_schema_path (absolute; default DATA/format_schemas)")
    ap.add_argument("--users", help="users file (default: a password-less default user)")
    a = ap.parse_args()
    data = os.path.abspath(a.data)
    schemas = os.path.abspath(a.schemas or os.path.join(data, "format_schemas"))
    os.makedirs(schemas, exist_ok=True)
    users = ""
    if a.users:
        path = os.path.abspath(a.users)
        users = (f"  <user_directories><users_xml><path>{path}</path></users_xml>"
                 "</user_directories>\n")
    os.chdir(data)
    with open("config.xml", "w") as f:
        f.write(CONFIG.format(http=a.http_port, tcp=a.tcp_port, schemas=schemas, users=users))
    engine = load_engine()
    # Never returns: the last statement sleeps in the server, keeping it up.
    engine.query("SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
                 "SELECT sleepEachRow(1) FROM numbers(1000000000) "
                 "SETTINGS max_block_size = 1 FORMAT Null",
                 "TabSeparated", path=os.path.join(data, "db"))


if __name__ == "__main__":
    main()
